"""``lenslab-box``: the lab on a box without a Docker engine (an instance that is itself a
container). It supervises detached training runs, keeps Jupyter, reports the box's facts and,
as a container's start command (``lenslab-box serve``), runs an unprivileged sshd.

Standard library only: it runs on the box next to the trainer, and the laptop speaks to it
over SSH, reading the JSON it prints.
"""
