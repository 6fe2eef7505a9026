"""unionimg: one read-only BASE image shared by many VMs, one small writable U image per VM.

Concepts, the reconcile case table and the architecture: ``docs/design.md``. Modules by role,
top to bottom; a module imports only from its own group or groups below it (import-linter
contracts in pyproject.toml, run by ``make lint``):

cli/  the command line (click): ``_common`` + one module per command group, loaded lazily
    base_cmd, instance_cmd, union_cmd, history_cmd, reconcile_cmd, boot_cmd, timer_cmd,
    layer_cmd,
    registry_cmd, system_cmd, host_cmd, deploy_cmd

deploy       the controller's side of a deploy: push, then every host at once over SSH
placement/   spare-image placement: where each layer is kept so a failed server's VMs
             recover elsewhere with no transfer (docs/placement.md)
    model, greedy, exact, planner, example, generate   pure: the cluster (TOML) and the
                       evaluation of a plan; the seed's filters, the conventional baseline,
                       the heuristic; the CP-SAT model; choosing and explaining
    fromstore          a cluster from a system node and a servers file (hosts)
    apply              apply placement to hosts (registry, pulls over SSH); recover a VM
                       on a host from the layers there, then place again

snapshots/  repeated, differential VM snapshots (memory + U), off the host, restored (beside
            deploy)
    policy             pure: the adaptive interval from CPU load, durations, retention
    chunks             the content-addressed chunk store (zstd, verified), files cut into chunks
    capture            a paused guest's memory (libvirt) and U copied; resume from memory
    core               take, list, rm, prune, gc, restore
    remote             push missing chunks to a host; the receiving side
    schedule           the long-running adaptive loop, its lock and log

migrate/  a VM moved to another host, sending only the content it has nowhere (issue 14)
    plan               pure: a tree manifest checked as hostile input; what is sent and why
    wire               the framed stream (offer, layer blobs, contents, end), read bounded
    tree               trees scanned into manifests; made again from one, verified
    index              the content a store holds by sha256: object cache, bases, layers
    send               the sender: scan, offer, stream over SSH, keep, remove
    receive            the receiver: answer an offer; take a stream, verify, make the VM

ops          what needs several layers at once: instance remove, base remove/gc, fsck
systems      the system tree: nodes of VMs on layers, pushed as OCI manifests; a node
             made real on a host (materialize: pull what it lacks, make the VMs)
hosts        hosts reached over OpenSSH (the one module running ssh): known keys, the
             store's key, shared connections, remote errors as ours
timer        unattended reconcile: systemd timer or cron.d line

registry/  the image repository: an OCI registry (beside reconcile and boot)
    manifests          pure: image-tree and system node manifests, media types, names
    client             the one module that talks HTTP to a registry (distribution /v2/)
    server             docker-registry started with unionimg's config (loopback or a netns)
    transfer           push a chain as image-tree nodes; pull a node (blobs checked first)
    hostcache          push and pull bound to the store's layer cache (layers.layerstore)

reconcile/  merging a patched base into every instance
    plan, merge, policy   pure: the plan of one instance, 3-way text merge, per-glob policy
    structured, userdb    pure: mergers by path (files merged by meaning); the user
                       databases merged by name
    debconf            pure: debconf's databases merged record by record
    default_policy.toml   the shipped rules (volatile, generated, backups), after the admin's
    ldcache            /etc/ld.so.cache regenerated for a staged result (sandboxed ldconfig)
    checks             the staged result checked before the swap: the host's dpkg, apt-get,
                       pwck, grpck in a sandbox (checks_inside: its inside), compared
                       with B1's own result
    apply              the executor of plan: journal, apply, undo, reports

boot/  booting instances
    control            specs, render, boot, stop, switch hypervisor (asks the drivers)
    kernel             which kernel an instance boots, its initramfs (cached per kernel)
    umlprobe           which UML kernel boots here (probed once, cached)
    initramfs          the guest's early boot archive (guest_init.sh + modules)

layers/  bases, instances and their history
    base               bases and their immutable generations: each a whole image or a
                       delta layer over its parent, mounted as a chain
    gendelta           a generation's delta from its parent as an overlayfs upper layer
    layer              a layer's canonical tar: written (diff_id, zstd blob), read defensively
    layerstore         the host's layer cache: layers by digest, chains, blobs, refs, gc
    snapshot           instance snapshot (U's upper frozen into a layer), VMs made from a
                       layer, an instance's chain of snapshot layers
    instance           instances: U image, MAC, hypervisor, resources
    union              the host-side union mount of an instance (its whole chain)
    status             an instance's local changes, commit and log
    chainview          what lies under a VM's U as one lookup: its snapshot layers over its
                       generation's manifest (status, per-VM identity)
    history            Mercurial history on the layers through python-hglib
    ucheck             U images checked (e2fsck) and mounted as guest data
    running            running.json and crashed.json: whether an instance's guest runs (its
                       driver says), why its last boot failed (the console says)
    sandbox            base update --run: the admin's command contained in the new tree
    identity           per-VM identity (machine-id, SSH host keys) kept out of generations,
                       made per instance

hypervisors/  one driver per hypervisor, found by name (__init__: the Driver interface,
              its records and the registry; templates/: links to hypervisor_profiles/ and
              udev_rules/)
    spec               what a driver needs to boot one instance (pure)
    profiles           the shared rendering core: escaping per format, NIC naming (pure)
    kvm, kvmprobe      KVM/QEMU guests through libvirtd; does KVM really run a guest here
    uml                User-Mode Linux guests: taps, the linux.uml process, clean stop
    xen                Xen: xl.cfg and libvirt XML, rendered only
    virtualbox         VirtualBox: VBoxManage script, VMDKs, boot disk; rendered only

store/  the store on disk
    layout             the store's layout, locks, atomic writes
    records            every JSON file unionimg writes, as a typed record (the one schema)
    probecache         the on-disk cache of capability probes

fs/  file systems
    fsops              file operations confined to an upper tree (no symlink followed)
    mounts             the one way to mount: loop images, overlay unions, cleanup
    image              raw ext4 images made with mke2fs -d, labels, sizes
    manifest           tree scans into entries, digests, SQLite manifests, their delta
    space              free space, "store full" messages, write-back error checks

Foundation:
    entries            the Entry model of one path, the sidecar text (pure)
    errors             user errors with their exit codes (the one table)
    runner             the one way to run a program (argument list, never a shell)
    poll               the one bounded wait
    names              validation of what users type (names, MACs, sizes, hypervisors)
    display            guest-controlled text made safe to print
    mac                deterministic per-instance MAC addresses
    faults             named crash and full-disk points for the tests

Not installed: ``dev/demo.py`` (make demo), ``vm_fixtures/`` (test and demo images).
"""
