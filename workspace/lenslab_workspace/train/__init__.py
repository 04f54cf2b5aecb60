"""Resilient SAE training: crash-safe checkpoints, exact resume, signals, status, mirror.

The modules, from the bottom up:
- ``errors``: the exceptions the CLI turns into one-line messages and exit codes.
- ``fields``: what lenslab does with each SAELens runner field (honoured, replaced, refused);
  ``fieldtypes``: their names and types, read from SAELens's dataclasses.
- ``config``: the run file (TOML) -> validated settings -> SAELens's own config objects.
- ``rundir``: the stable layout of one run on disk.
- ``atomic``: fsync'd writes and renames, the primitives every durable write uses.
- ``checkpoint``: atomic, checksummed checkpoint directories and the background writer.
- ``dataset``: the dataset's rows and token sequences, made as SAELens makes them.
- ``data``: token sequences with an O(1) position, and the activation stream with a
  savable mixing buffer.
- ``models``: the language model, and the SAE training starts from.
- ``progress``: the terminal's progress and the recent tokens-per-second window.
- ``state``: snapshots of everything that must survive for an exact resume.
- ``mirror``: copies of committed checkpoints to any fsspec URL, uploaded in the background.
- ``status``: the ``status.json`` the laptop reads, and ``is_alive`` for it.
- ``launch``: the checks a launch makes before writing anything and right after the model is built.
- ``final``: the finished SAE in SAELens's format.
- ``runner``: the training loop that ties them together; ``cli``: ``lenslab-train``.
"""
