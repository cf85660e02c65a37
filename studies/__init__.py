"""Studies: the measurements behind BENCHMARKS.md and RELIABILITY.md.

These scripts measure how good, how fast and how robust ddpm-cars is; users of the
package never need them, so they live beside it rather than in it (the wheel holds
``ddpm_cars`` alone). Each module is a script: run it from the repository root, with the
package installed (``make install``) or with ``PYTHONPATH=src``, e.g.

    python -m studies.sampler_quality --help

``sampler_quality``
    Sample quality (SWD, pixel precision/recall) and speed of each sampler against its
    step count on a trained run
    (``python -m studies.sampler_quality --run runs/demo --num 500``).
``offline_metric``
    Whether the offline metric ranks held-out real images, a late and an early checkpoint
    correctly, and how long the offline evaluation of 1,000 images takes
    (``python -m studies.offline_metric --early runs/early --late runs/demo``).
``editing_quality``
    Quality of a run's inpaintings and variations
    (``python -m studies.editing_quality --run runs/demo --num 200 --out docs/benchmarks/editing``).
``batchnorm_modes``
    Colour saturation and contrast of the seed network's samples with running versus
    per-batch BatchNorm statistics
    (``python -m studies.batchnorm_modes --run runs/cmp-seed --out bn_modes.png``).
``throughput``
    Toy-car generation, training and sampling speed of the demo and seed presets
    (``python -m studies.throughput [--device cuda]``).
``kill_campaign``
    Kill-anywhere campaign: SIGKILLs a small CPU training run many times and checks every
    checkpoint loads, every resume works and no more than a checkpoint interval is lost
    (``make kill-campaign``, i.e. ``python -m studies.kill_campaign --kills 20``).

The speed table of the presets' networks is part of the package itself: ``ddpm-cars bench``.
"""
