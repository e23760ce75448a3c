"""`quantkit quantize --dry-run`: what a run will cost (memory, disk, time) and who will load its output, from
the headers and a timed probe on one block (see :mod:`quantkit.dryrun.run`)."""
