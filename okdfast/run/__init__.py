"""The training run, in one room: its set-up (``assemble``, ``device_checks``, ``precision``), its state
(``state``), the epoch (``epoch``) and the optimizer step (``step``), checkpoints (``checkpoint_contents``: what one
holds and how a run is restored; ``checkpoint_file``: the file, written atomically and read back safely), what a
start is (``resume``), the run folder (``folder``), SIGINT / SIGTERM (``signals``), progress lines (``progress``),
the test pass over every branch and head (``scoring``, ``predictions``; ``checkpoint_evaluation`` for a saved
checkpoint), and the whole run read top to bottom (``engine``). The command lines on top: ``okdfast.train`` and
``okdfast.evaluate``.
"""
