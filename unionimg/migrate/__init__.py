"""Migration of a VM to another host over a narrow link, sending only content the receiver
has nowhere (issue 14): manifests exchanged, the receiver's content indexed by hash, files
sent whole (zstd) or as deltas, the VM rebuilt and verified there."""
