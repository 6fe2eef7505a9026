"""Hypervisor drivers: what a driver needs (spec), rendered profiles, kvm, uml, xen, virtualbox."""
