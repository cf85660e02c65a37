"""Benchmarks: how fast, how good and how robust ddpm-cars is, measured on this machine.

Each module measures one thing; BENCHMARKS.md and RELIABILITY.md hold the numbers, with
the command that produced them.

``bench``, ``measure``
    ``ddpm-cars bench``: parameters, forward FLOPs, training and sampling speed, achieved
    FLOP/s and peak memory of the presets' networks at fp32 and bf16 (and diffusers'
    ``UNet2DModel`` for comparison when it is installed). :mod:`.measure` makes one
    measurement, :mod:`.bench` runs them and prints the table. Run
    ``ddpm-cars bench --presets improved,demo``.
``throughput``
    Toy-car generation, training and sampling speed of the demo and seed presets.
    Run ``python -m ddpm_cars.benchmarks.throughput [--device cuda]``.
``sampler_quality``
    Sample quality (SWD, pixel precision/recall) and speed of each sampler against its
    step count on a trained run. Run
    ``python -m ddpm_cars.benchmarks.sampler_quality --run runs/demo --num 500``.
``offline_metric``
    Whether the offline metric ranks held-out real images, a late and an early checkpoint
    correctly, and how long the offline evaluation of 1,000 images takes. Run
    ``python -m ddpm_cars.benchmarks.offline_metric --early runs/early --late runs/demo``.
``batchnorm_modes``
    Colour saturation and contrast of the seed network's samples with running versus
    per-batch BatchNorm statistics. Run
    ``python -m ddpm_cars.benchmarks.batchnorm_modes --run runs/cmp-seed --out bn_modes.png``.
``kill_campaign``
    Kill-anywhere campaign: SIGKILLs a small CPU training run many times and checks every
    checkpoint loads, every resume works and no more than a checkpoint interval is lost.
    Run ``make kill-campaign`` (``python -m ddpm_cars.benchmarks.kill_campaign --kills 20``).

The modules other than ``bench`` and ``measure`` are scripts:
``python -m ddpm_cars.benchmarks.NAME --help`` lists their options.
"""
