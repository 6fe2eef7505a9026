"""File systems: confined file operations, mounts, ext4 images, manifests of trees."""
