"""ReClo agent: makes image backups of a server's disks and restores them.

The VHD format code lives in :mod:`reclo_agent.vhd`; the portal's worker
imports that same package to verify uploads and consolidate chains.
"""

__version__ = "0.1.0"
