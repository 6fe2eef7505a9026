"""Boot: the guest's early boot, the UML kernel in use, running state, start/stop/switch."""
