"""unionimg: one read-only BASE image shared by many VMs, one small writable U image per VM.

Concepts, the reconcile case table and the architecture: ``docs/design.md``. Modules by role
(the package is flat for now; issue 11 regroups it into subpackages):

Pure (take data, return data; no programs, mounts or Mercurial):
    plan               the reconcile plan of one instance, one action per upper path
    merge              line-level 3-way merge of text files (merge3)
    policy             per-glob reconcile policy from TOML
    manifest           the Entry model, tree scans, SQLite manifests, sidecar, base delta
    names              validation of what users type (names, MACs, sizes, hypervisors)
    mac                deterministic per-instance MAC addresses
    bootspec           what a hypervisor profile needs to boot one instance
    profiles           per-hypervisor boot recipes rendered from Jinja2 templates
    display            guest-controlled text made safe to print
    errors             user errors with their exit codes (the one table)

Edges (the few modules that run programs, mount, or talk to hg / libvirt):
    runner             the one way to run a program (argument list, never a shell)
    mounts             the one way to mount: loop images, overlay unions, cleanup
    ucheck             U images checked (e2fsck) and mounted as guest data
    image              raw ext4 images made with mke2fs -d, labels, sizes
    fsops              file operations confined to an upper tree (no symlink followed)
    hgrepo             Mercurial history on the layers through python-hglib
    libvirt_driver     KVM/QEMU guests through libvirtd
    uml_driver         User-Mode Linux guests: taps, the linux.uml process, clean stop
    kvmprobe           does KVM really run a guest here (probed once, cached)
    umlprobe           which UML kernel boots here (probed once, cached)
    probecache         the on-disk cache of those probes
    initramfs          the guest's early boot archive (guest_init.sh + modules)
    vbox               VirtualBox boot disk (SYSLINUX on FAT) without mounting
    sandbox            base update --run: the admin's command contained in the new tree
    timer              unattended reconcile: systemd timer or cron.d line

Orchestration (objects and commands, built on the above):
    store              the store's layout, locks and atomic writes
    base               bases and their immutable generations
    instance           instances: U image, MAC, hypervisor, resources
    union              the host-side union mount of an instance
    status             an instance's local changes, commit and log
    reconcile          the executor of plan: journal, apply, undo, reports
    boot               boot pieces, rendering, start, stop, switch hypervisor
    hypervisors_state  whether a guest runs, and why its last boot failed
    cli                the unionimg command line (click)

Development:
    demo               make demo: the whole story on an embedded store
    faults             named crash and full-disk points for the tests
"""
