"""unionimg: one read-only BASE image shared by many VMs, one small writable U image per VM.

Concepts, the reconcile case table and the architecture (its rules are import-linter contracts
run by ``make lint``): ``docs/design.md``. Modules by role; imports go down this list only
(``cli -> ops -> {reconcile, boot} -> hypervisors -> layers -> {fs, store} -> foundation``):

Foundation (no unionimg imports beyond each other):
    errors             user errors with their exit codes (the one table)
    runner             the one way to run a program (argument list, never a shell)
    names              validation of what users type (names, MACs, sizes, hypervisors)
    display            guest-controlled text made safe to print
    mac                deterministic per-instance MAC addresses
    faults             named crash and full-disk points for the tests

store/  the store on disk
    layout             the store's layout, locks, atomic writes, space checks
    records            every JSON file unionimg writes, as a typed record (the one schema)
    probecache         the on-disk cache of capability probes

fs/  file systems
    fsops              file operations confined to an upper tree (no symlink followed)
    mounts             the one way to mount: loop images, overlay unions, cleanup
    image              raw ext4 images made with mke2fs -d, labels, sizes
    manifest           the Entry model, tree scans, SQLite manifests, sidecar, base delta

layers/  bases, instances and their history
    base               bases and their immutable generations
    instance           instances: U image, MAC, hypervisor, resources
    union              the host-side union mount of an instance
    status             an instance's local changes, commit and log
    history            Mercurial history on the layers through python-hglib
    ucheck             U images checked (e2fsck) and mounted as guest data
    sandbox            base update --run: the admin's command contained in the new tree

reconcile/  merging a patched base into every instance
    plan, merge, policy   pure: the plan of one instance, 3-way text merge, per-glob policy
    apply              the executor of plan: journal, apply, undo, reports

hypervisors/  one driver per hypervisor, found by name (__init__: the Driver interface,
              its records and the registry; templates/: the Jinja2 templates)
    spec               what a driver needs to boot one instance
    profiles           the shared rendering core: escaping per format, NIC naming (pure)
    kvm, kvmprobe      KVM/QEMU guests through libvirtd; does KVM really run a guest here
    uml                User-Mode Linux guests: taps, the linux.uml process, clean stop
    xen                Xen: xl.cfg and libvirt XML, rendered only
    virtualbox         VirtualBox: VBoxManage script, VMDKs, boot disk; rendered only

boot/  booting instances
    initramfs          the guest's early boot archive (guest_init.sh + modules)
    umlprobe           which UML kernel boots here (probed once, cached)
    kernel             which kernel an instance boots, its initramfs (cached per kernel)
    running            running.json and crashed.json: whether a guest runs, why it failed
    control            specs, render, boot, stop, switch hypervisor (asks the drivers)

Top:
    timer              unattended reconcile: systemd timer or cron.d line
    cli                the unionimg command line (click)

Not installed: ``dev/demo.py`` (make demo), ``vm_fixtures/`` (test and demo images).
"""
