"""unionimg's image repository: an OCI registry (CNCF Distribution) and its client.

manifests      pure: image-tree and system node manifests, media types, names, checks
client         the one module that talks HTTP to a registry (distribution-spec /v2/)
server         a registry (docker-registry) started with unionimg's own config
transfer       push a chain of layers as nodes; pull a node into a host's layer cache
"""
