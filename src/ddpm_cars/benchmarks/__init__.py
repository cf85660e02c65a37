"""``ddpm-cars bench``: how fast the presets' networks are, measured on this machine.

Parameters, forward FLOPs, training and sampling speed, achieved FLOP/s and peak memory
of the presets' networks at fp32 and bf16 (and diffusers' ``UNet2DModel`` for comparison
when it is installed). Run ``ddpm-cars bench --presets improved,demo``.

``measure``
    One measurement of one network at one precision.
``loop``
    The whole training loop's figures (``--loop``): images per second through the loop's
    own batches, and the time to the first step.
``peaks``
    Datasheet peak FLOP/s of common GPUs, for model FLOP utilisation (MFU).
``bench``
    Runs the measurements and prints the table.

The other measurements (sample quality, the offline metric, editing, throughput, the
kill-anywhere campaign) are studies outside the package: the repository's ``studies/``.
"""
