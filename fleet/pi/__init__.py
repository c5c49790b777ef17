"""The Raspberry Pi 5 as a build and check target, from the operator's x86_64 machine: an emulated Debian 12
arm64 root (``root``), the Pi 5 wheelhouse (``wheelhouse`` builds it, ``wheelcheck`` verifies one against a
target without installing anything) and the facts about the target itself (``target``)."""
