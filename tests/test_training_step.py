"""The training step decides on the device: host reads per step, fp16 with loss scaling,
the masked EMA, and the precision ``auto`` resolves to."""

import contextlib
from collections import Counter

import pytest
import torch

from ddpm_cars import runtime
from ddpm_cars.data import build_dataset
from ddpm_cars.parallel import World
from ddpm_cars.runtime import cpu_has_native_bf16  # the real one: conftest makes `auto` mean fp32 in tests
from ddpm_cars.training import loop, train
from ddpm_cars.training.batches import Batches, Position
from ddpm_cars.training.ema import EMA
from ddpm_cars.training.logs import read_loss_log

# Every way a tensor's value reaches Python (each one waits for the device).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Counts, by name, the calls of the Tensor methods that copy a value to the host."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _improved_tiny(tiny_config, **train_fields):
    """Learned variance, clipping, EMA and AdamW: every branch of the update step."""
    return tiny_config.replace(
        model={
            "name": "res_attn_unet",
            "channels": (16, 32),
            "num_res_blocks": 1,
            "attention_resolutions": (8,),
            "head_channels": 16,
        },
        diffusion={"schedule": "cosine", "loss": "l2", "learn_variance": True},
        data={"toy_count": 512},  # 32 batches an epoch: no epoch end among the steps counted
        train={
            "epochs": 100,
            "sample_every_epochs": 100,
            "checkpoint_every_steps": 1000,
            "optimizer": "adamw",
            "lr": 1e-3,
            "grad_clip": 1.0,
            "ema_decay": 0.99,
            "precision": "fp32",
            **train_fields,
        },
    )


def _count_reads_of_the_loop(monkeypatch, config, run_dir):
    """Host reads made while ``Session.run`` trains (setup and the final save excluded)."""
    counts = Counter()
    real_run = loop.Session.run

    def run(self, bar, stop):
        with counting_host_reads() as seen:
            stopped = real_run(self, bar, stop)
        counts.update(seen)
        return stopped

    monkeypatch.setattr(loop.Session, "run", run)
    train(config, run_dir, progress=False, final_grid=False)
    return counts


@pytest.mark.parametrize("model", ["improved", "seed"])
def test_the_loop_reads_the_device_once_per_log_every_steps(tmp_path, tiny_config, monkeypatch, model):
    config = _improved_tiny(tiny_config, max_steps=20, log_every_steps=5)
    if model == "seed":  # SimpleUnet with BatchNorm, L1, Adam, no EMA, no clipping
        config = tiny_config.replace(
            data={"toy_count": 512},
            train={
                "max_steps": 20,
                "epochs": 100,
                "log_every_steps": 5,
                "checkpoint_every_steps": 1000,
                "precision": "fp32",
            },
        )
    counts = _count_reads_of_the_loop(monkeypatch, config, tmp_path)
    assert sum(counts.values()) <= 20 // 5, counts
    assert counts["tolist"] == 4  # one transfer per read, carrying five steps' losses and skip flags
    assert [s for s, _ in read_loss_log(tmp_path / "loss.csv", 99)] == list(range(1, 21))  # every step is logged


def test_fp16_with_loss_scaling_trains_like_fp32(tmp_path, tiny_config, monkeypatch):
    """The first step's loss and (unscaled) gradient in fp16 are fp32's within fp16's precision."""
    config = _improved_tiny(tiny_config, max_steps=1)
    grads = {}
    original = loop.gradients_usable

    def record(model, loss, max_norm, **kwargs):
        usable = original(model, loss, None, **kwargs)  # unclipped, as the scaler has unscaled it
        grads[kwargs.get("check_gradients", False)] = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
        return usable

    monkeypatch.setattr(loop, "gradients_usable", record)
    train(config, tmp_path / "fp32", progress=False, final_grid=False)
    train(config.replace(train={"precision": "fp16"}), tmp_path / "fp16", progress=False, final_grid=False)
    g32, g16 = grads[False], grads[True]
    assert torch.isfinite(g16).all()
    assert (g16 - g32).norm() / g32.norm() < 0.01  # measured: 0.0006 on this tiny model
    (_, l32), (_, l16) = (read_loss_log(tmp_path / d / "loss.csv", 99)[0] for d in ("fp32", "fp16"))
    assert l16 == pytest.approx(l32, rel=0.01)


def test_an_overflowing_fp16_step_is_skipped_on_the_device(tiny_config):
    """A loss scale so large that the fp16 gradients overflow: the weights, the moments and
    the average stay, the scale halves, and the host reads nothing to decide it."""
    config = _improved_tiny(tiny_config, precision="fp16")
    world, device = World(), torch.device("cpu")
    trainee = loop.Trainee.build(config, world, device)
    trainee.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    data = build_dataset(config.data, progress=False)
    batch = Batches(data, config, world, device).draw(
        Position(), torch.Generator().manual_seed(0), trainee.denoiser.schedule.timesteps
    )
    before = [p.detach().clone() for p in trainee.model.parameters()]
    average = [p.detach().clone() for p in trainee.ema.model.parameters()]
    with counting_host_reads() as counts:
        loss = loop.loss_and_gradients(trainee, batch, config.train, world)
        applied = loop.guarded_update(trainee, loss, config.train, step=0)
    assert sum(counts.values()) == 0, counts
    assert not applied and torch.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(before, trainee.model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(average, trainee.ema.model.parameters()))
    assert all(int(s["step"]) == 0 for s in trainee.optimizer.state.values())
    assert trainee.scaler.get_scale() == 2.0**99

    trainee.optimizer.zero_grad(set_to_none=True)  # a scale that fits: the next step applies
    trainee.scaler = torch.amp.GradScaler("cpu")
    applied = loop.guarded_update(
        trainee, loop.loss_and_gradients(trainee, batch, config.train, world), config.train, step=1
    )
    assert applied and not all(torch.equal(a, p) for a, p in zip(before, trainee.model.parameters()))
    assert all(int(s["step"]) == 1 for s in trainee.optimizer.state.values())


def test_fp16_resume_continues_the_loss_scale(tmp_path, tiny_config):
    config = _improved_tiny(tiny_config, precision="fp16", max_steps=2, checkpoint_every_steps=1)
    train(config, tmp_path, progress=False, final_grid=False)
    from ddpm_cars import run as ckpt

    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path))
    assert state.scaler is not None and state.scaler["scale"] == 65536.0
    result = train(config.replace(train={"max_steps": 3}), tmp_path, resume=True, progress=False, final_grid=False)
    assert result.step == 3


def test_the_masked_average_moves_only_where_the_step_applied():
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    shadow = [p.clone() for p in ema.model.parameters()]
    ema.update(model, torch.tensor(False))
    assert all(torch.equal(s, p) for s, p in zip(shadow, ema.model.parameters()))
    ema.update(model, torch.tensor(True))
    weight = 1 - min(0.9, 3 / 12)  # the second update's ramped decay
    assert all(
        torch.equal(p, s.lerp(live, weight)) for p, s, live in zip(ema.model.parameters(), shadow, model.parameters())
    )


def test_the_cpu_kind_is_named_by_its_bfloat16_instructions(tmp_path):
    flags = tmp_path / "cpuinfo"
    for line, kind in [
        ("fpu sse2 avx2 fma", "AVX2"),
        ("fpu avx2 avx512f avx512_bf16", "AVX-512 BF16"),
        ("fpu avx2 avx512_bf16 amx_bf16 amx_tile", "AMX"),
        ("fpu sse2", "other"),
    ]:
        flags.write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        assert runtime.cpu_kind(flags) == kind, line
    assert runtime.cpu_kind(tmp_path / "missing") == "unknown"


def test_auto_precision_follows_the_device(tmp_path, monkeypatch):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_has_native_bf16.__wrapped__(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16.__wrapped__(flags)
    flags.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16.__wrapped__(flags)
    assert not cpu_has_native_bf16.__wrapped__(tmp_path / "missing")

    for native, expected in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        assert runtime.resolve_precision("auto", "cpu") == expected
    assert runtime.resolve_precision("fp16", "cpu") == "fp16"  # a choice made by hand stands
    for bf16, expected in [(True, "bf16"), (False, "fp16")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=bf16: v)
        assert runtime.resolve_precision("auto", "cuda") == expected


def test_activation_checkpointing_refuses_the_batchnorm_model(tiny_config):
    from ddpm_cars.errors import UserError

    with pytest.raises(UserError, match="res_attn_unet"):
        tiny_config.replace(train={"activation_checkpointing": True})


def test_compile_is_on_by_default_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.wants_compile(None, cuda) and not runtime.wants_compile(None, cpu)
    assert runtime.wants_compile(True, cpu) and not runtime.wants_compile(False, cuda)


def _compile_with(monkeypatch, backend):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend, **kw))


def _failing_backend(graph, example_inputs):
    raise RuntimeError("no working C++ compiler\nmore detail")


def test_a_failing_compiler_falls_back_to_the_network_with_one_warning(monkeypatch):
    _compile_with(monkeypatch, _failing_backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU())
    net = runtime.prepare_model(model, compile=True)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(
        runtime.CompileWarning, match=r"^torch.compile failed \(.*no working C\+\+ compiler\); running"
    ) as record:
        first, second = net(x), net(x)
    assert len(record) == 1 and "more detail" not in str(record[0].message)
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))
    first.sum().backward()
    assert model[0].weight.grad is not None


def test_compiled_network_runs_without_warning_and_model_errors_stay_raised(monkeypatch, recwarn):
    _compile_with(monkeypatch, "eager")  # dynamo traces the network; no code generation needed
    model = torch.nn.Linear(4, 2)
    net = runtime.prepare_model(model, compile=True)
    x = torch.randn(3, 4)
    assert torch.equal(net(x), model(x))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        net(torch.randn(3, 5))  # wrong input: the model's own error, from the uncompiled retry
    assert not [w for w in recwarn if w.category is runtime.CompileWarning]


def test_images_per_second_count_training_steps_only(tmp_path, tiny_config, monkeypatch):
    """Checkpoints, grids and epoch ends between steps take time that the images/s of the
    progress bar and the trackers leave out: on a clock where a step takes 1 s and
    everything else 100 s, every rate is one batch per second."""
    import types

    from ddpm_cars.training import logs

    clock = [0.0]
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step = loop.loss_and_gradients

    def step(*args, **kwargs):
        clock[0] += 1.0
        return real_step(*args, **kwargs)

    def slow(real):
        def method(*args, **kwargs):
            clock[0] += 100.0
            return real(*args, **kwargs)

        return method

    monkeypatch.setattr(loop, "loss_and_gradients", step)
    monkeypatch.setattr(loop.Session, "_end_epoch", slow(loop.Session._end_epoch))  # a grid and a checkpoint
    monkeypatch.setattr(loop.Checkpoints, "save", slow(loop.Checkpoints.save))
    rates = []
    real_read = logs.PendingSteps.read

    def read(self, batch_size):
        rows, rate = real_read(self, batch_size)
        rates.append((len(rows), rate))
        return rows, rate

    monkeypatch.setattr(logs.PendingSteps, "read", read)
    config = tiny_config.replace(train={"max_steps": 10, "log_every_steps": 2, "checkpoint_every_steps": 3})
    train(config, tmp_path / "run", progress=False, final_grid=False)
    rates = [rate for rows, rate in rates if rows]
    assert len(rates) >= 5 and all(rate == pytest.approx(config.train.batch_size) for rate in rates), rates
