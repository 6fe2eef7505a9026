"""The xen driver: renders a Xen guest's configuration; it does not start guests.

Its profile is ``xl.cfg`` (PVH, for ``xl create``) and ``domain.xml`` (the libvirt/libxl
twin), from ``templates/xen/``: direct kernel boot with ``console=hvc0``, BASE as ``xvda``
(``access=ro``), U as ``xvdb``, the chain's layers as ``xvdc``... (``access=ro``), one vif
with the instance's MAC on bridge :data:`XEN_BRIDGE`.

No Xen runs here: ``xl`` cannot even parse a configuration without a running hypervisor, and
libvirt's Xen driver cannot initialise. So unionimg renders (``unionimg render VM --hypervisor
xen --out DIR``) and the admin starts the guest on a Xen host; the libvirt XML is checked by
``virt-xml-validate`` (the conformance suite runs it), the xl.cfg by a parser of xl's grammar
in the tests.
"""

from __future__ import annotations

from typing import Final

from unionimg.hypervisors import Capabilities, Driver
from unionimg.hypervisors.profiles import common, layer_disks, render_template
from unionimg.hypervisors.spec import BootSpec

#: Bridge the Xen profile plugs the NIC into (BootSpec has no network field yet).
XEN_BRIDGE: Final = "xenbr0"
#: The most layers a chain may have under xen: one disk letter each, xvdc to xvdz.
MAX_LAYERS: Final = 24
#: The console the xen profile puts first on the kernel command line (xenconsoled's).
CONSOLE: Final = "console=hvc0"


def _xl_disk(vdev: str, access: str, image: str) -> str:
    # target= must come last: everything after it, commas included, is the path
    return f"format=raw,vdev={vdev},access={access},target={image}"


def render(spec: BootSpec) -> dict[str, str]:
    """``xl.cfg`` and ``domain.xml`` of ``spec``."""
    ctx = common(spec, CONSOLE)
    layers = layer_disks(
        spec,
        MAX_LAYERS,
        "xen",
        "disks xvda-xvdz, two of them BASE and U",
        lambda i: "xvd" + chr(ord("c") + i),
    )
    ctx |= {
        "bridge": XEN_BRIDGE,
        "layers": layers,
        "disks": [
            _xl_disk("xvda", "ro", str(spec.base_image)),
            _xl_disk("xvdb", "rw", str(spec.upper_image)),
            *(_xl_disk(layer.device, "ro", layer.image) for layer in layers),
        ],
        "vifs": [f"mac={ctx['mac']},bridge={XEN_BRIDGE}"],
    }
    return {
        "xl.cfg": render_template("xen/xl.cfg.j2", ctx),
        "domain.xml": render_template("xen/domain.xml.j2", ctx),
    }


class XenDriver(Driver):
    name = "xen"
    capabilities = Capabilities(
        can_start=False,
        can_snapshot=True,  # xl save / restore
        validated_by=("virt-xml-validate",),  # domain.xml; xl.cfg has no validator without Xen
        kernel="guest",
    )

    def can_boot_here(self) -> tuple[bool, str]:
        return False, (
            "unionimg renders Xen configurations (xl.cfg, libvirt XML) but does not start Xen "
            "guests; start the rendered xl.cfg with 'xl create' on a Xen host"
        )

    def render(self, spec: BootSpec) -> dict[str, str]:
        return render(spec)


DRIVER = XenDriver()
