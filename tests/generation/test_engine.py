"""The diffusion engine and model registry on the real tiny pipeline (64×64, 2 steps, CPU)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from service.generation.engine import (
    DiffusionEngine,
    GenerationCancelled,
    ImageRequest,
    bucket_key,
    latents_to_preview,
    select_device_and_dtype,
)
from service.generation.models import (
    ALLOWED_PIPELINE_CLASSES,
    ModelConfigError,
    ModelRegistry,
    ModelSpec,
    check_model,
    pipeline_class_name,
    resolve_pipeline_class,
)
from service.generation.tiny import TINY_MODEL_NAME

SECRET_PROMPT = "portrait of Jane Example, MRN 12345"


def request(
    seed: int,
    *,
    job_id: str | None = None,
    prompt: str = "a healthy heart, flat illustration",
    negative_prompt: str | None = None,
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    guidance: float = 5.0,
) -> ImageRequest:
    return ImageRequest(
        job_id=job_id or f"job-{seed}",
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
    )


# -- device selection -------------------------------------------------------------------------------------


def test_device_selection_on_cpu_is_float32() -> None:
    assert select_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    # This machine has neither CUDA nor MPS, so "auto" must land on the CPU too.
    assert select_device_and_dtype("auto") == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("preference", ["tpu", "cpu:1", "", "CUDA"])
def test_device_selection_refuses_unknown_preferences(preference: str) -> None:
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        select_device_and_dtype(preference)


@pytest.mark.parametrize("preference", ["cuda", "cuda:0", "mps"])
def test_device_selection_refuses_unavailable_devices(preference: str) -> None:
    with pytest.raises(ValueError, match="not available"):
        select_device_and_dtype(preference)


# -- requests and buckets ---------------------------------------------------------------------------------


def test_bucket_key_names_model_size_steps_and_guidance() -> None:
    key = bucket_key(request(1, width=64, height=128, steps=3, guidance=7.5), "m")
    assert key == "m|64x128|steps=3|guidance=7.5"
    assert bucket_key(request(1, guidance=7), "m") == bucket_key(
        request(2, guidance=7.0, prompt="other"), "m"
    )
    assert bucket_key(request(1), "m") != bucket_key(request(1, steps=3), "m")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"job_id": ""}, "job_id"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"width": 60}, "width must be a positive multiple of 8"),
        ({"height": 0}, "height must be a positive multiple of 8"),
        ({"steps": 0}, "steps"),
        ({"guidance": -1.0}, "guidance"),
        ({"prompt": None}, "prompt must be a string"),
    ],
)
def test_image_request_validation(changes: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "job_id": "j",
        "prompt": SECRET_PROMPT,
        "negative_prompt": None,
        "seed": 1,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 5.0,
    }
    values.update(changes)
    with pytest.raises(ValueError, match=message) as caught:
        ImageRequest(**values)  # type: ignore[arg-type]
    assert "Jane" not in str(caught.value)


# -- generation -------------------------------------------------------------------------------------------


def test_generates_pil_images_of_the_requested_size(tiny_engine: DiffusionEngine) -> None:
    square = tiny_engine.generate([request(1), request(2)])
    assert [image.size for image in square] == [(64, 64), (64, 64)]
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in square)
    wide = tiny_engine.generate([request(1, width=128, height=64)])
    assert wide[0].size == (128, 64)
    # Different seeds must give different noise, or "reproducible" would be trivially true.
    assert not np.array_equal(np.asarray(square[0]), np.asarray(square[1]))


def test_seed_reproduces_alone_and_inside_a_batch(tiny_engine: DiffusionEngine) -> None:
    alone = tiny_engine.generate_arrays([request(42, prompt="a kidney")])[0]
    batch = tiny_engine.generate_arrays(
        [request(7), request(8, prompt="lungs"), request(42, prompt="a kidney"), request(9)]
    )
    assert alone.shape == (64, 64, 3)
    assert np.abs(alone - batch[2]).max() <= 1e-5
    assert np.abs(alone - batch[0]).max() > 1e-2
    # The 8-bit images can differ by at most one rounding step where a value sits on a boundary.
    alone_pil = np.asarray(tiny_engine.generate([request(42, prompt="a kidney")])[0], dtype=np.int16)
    batch_pil = np.asarray(
        tiny_engine.generate([request(3), request(42, prompt="a kidney")])[1], dtype=np.int16
    )
    assert np.abs(alone_pil - batch_pil).max() <= 1


def test_same_request_twice_gives_the_same_image(tiny_engine: DiffusionEngine) -> None:
    first = tiny_engine.generate([request(5)])[0]
    second = tiny_engine.generate([request(5)])[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_requests_from_different_buckets_are_refused_naming_the_difference(
    tiny_engine: DiffusionEngine,
) -> None:
    with pytest.raises(ValueError, match=r"differing: width \(128, 64\), steps \(2, 3\)") as caught:
        tiny_engine.generate([request(1, prompt=SECRET_PROMPT), request(2, width=128, steps=3)])
    assert "Jane" not in str(caught.value)
    with pytest.raises(ValueError, match="guidance"):
        tiny_engine.generate([request(1), request(2, guidance=1.0)])


def test_empty_and_oversized_batches_are_refused(tiny_engine: DiffusionEngine) -> None:
    with pytest.raises(ValueError, match="at least one request"):
        tiny_engine.generate([])
    # The tiny spec caps 64×128 (inside the 128 bucket) at 8 per batch.
    with pytest.raises(ValueError, match="batch of 9 exceeds the cap of 8 for 64x128"):
        tiny_engine.generate([request(seed, height=128) for seed in range(9)])


def test_progress_callback_sees_every_step_in_order(tiny_engine: DiffusionEngine) -> None:
    seen: list[tuple[int, int]] = []
    tiny_engine.generate([request(1, steps=3), request(2, steps=3)], on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancellation_between_steps_raises_and_stops_early(tiny_engine: DiffusionEngine) -> None:
    seen: list[int] = []
    with pytest.raises(GenerationCancelled, match="after step 1 of 4"):
        tiny_engine.generate(
            [request(1, steps=4)], on_step=lambda k, n: seen.append(k), should_cancel=lambda: bool(seen)
        )
    assert seen == [1]
    # The interrupt flag must not leak into the next call.
    after = tiny_engine.generate([request(1)], on_step=lambda k, n: seen.append(k))
    assert seen == [1, 1, 2]
    assert np.array_equal(np.asarray(after[0]), np.asarray(tiny_engine.generate([request(1)])[0]))


def test_cancellation_before_start_never_enters_the_pipeline(tiny_engine: DiffusionEngine) -> None:
    seen: list[int] = []
    with pytest.raises(GenerationCancelled, match="before it started"):
        tiny_engine.generate([request(1)], on_step=lambda k, n: seen.append(k), should_cancel=lambda: True)
    assert seen == []


def test_progress_callback_errors_propagate_and_engine_recovers(tiny_engine: DiffusionEngine) -> None:
    def broken(step: int, total: int) -> None:
        raise RuntimeError("progress store down")

    with pytest.raises(RuntimeError, match="progress store down"):
        tiny_engine.generate([request(1)], on_step=broken)
    assert len(tiny_engine.generate([request(1)])) == 1


def test_previews_come_from_latents_at_latent_resolution(tiny_engine: DiffusionEngine) -> None:
    previews: list[tuple[int, list[Image.Image]]] = []
    tiny_engine.generate([request(1), request(2)], on_preview=lambda k, images: previews.append((k, images)))
    assert [step for step, _ in previews] == [1, 2]
    assert all(len(images) == 2 and images[0].size == (8, 8) for _, images in previews)
    assert not np.array_equal(np.asarray(previews[-1][1][0]), np.asarray(previews[-1][1][1]))


def test_latent_preview_refuses_other_latent_layouts() -> None:
    assert latents_to_preview(torch.zeros(1, 4, 2, 3))[0].size == (3, 2)
    with pytest.raises(ValueError, match=r"\(batch, 4, h, w\)"):
        latents_to_preview(torch.zeros(1, 16, 8, 8))


def test_negative_prompt_is_used_only_when_the_model_supports_it(
    make_tiny_spec: Callable[..., ModelSpec], tiny_engine: DiffusionEngine, tiny_model_path: Path
) -> None:
    plain = tiny_engine.generate_arrays([request(3)])[0]
    with_negative = tiny_engine.generate_arrays([request(3, negative_prompt="blurry, text")])[0]
    assert np.abs(plain - with_negative).max() > 1e-3

    no_negative_engine = DiffusionEngine(
        make_tiny_spec(tiny_model_path, supports_negative_prompt=False),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    no_negative_engine.load()
    ignored = no_negative_engine.generate_arrays([request(3, negative_prompt="blurry, text")])[0]
    assert np.abs(plain - ignored).max() <= 1e-6


def test_mixed_negative_prompts_stay_batch_invariant(tiny_engine: DiffusionEngine) -> None:
    alone = tiny_engine.generate_arrays([request(11)])[0]
    batch = tiny_engine.generate_arrays([request(12, negative_prompt="dark"), request(11)])
    assert np.abs(alone - batch[1]).max() <= 1e-5


def test_two_threads_never_run_the_pipeline_together(tiny_engine: DiffusionEngine) -> None:
    expected = {seed: np.asarray(tiny_engine.generate([request(seed)])[0]) for seed in (21, 22)}
    events: list[tuple[str, int]] = []
    pipeline = tiny_engine.pipeline
    # Hooks on the first and the last module the pipeline runs record who is inside it.
    hooks = [
        pipeline.text_encoder.register_forward_pre_hook(
            lambda module, args: events.append(("enter", threading.get_ident()))
        ),
        pipeline.vae.decoder.register_forward_hook(
            lambda module, args, output: events.append(("exit", threading.get_ident()))
        ),
        pipeline.unet.register_forward_hook(
            lambda module, args, output: (events.append(("step", threading.get_ident())), time.sleep(0.02))[
                -1
            ]
        ),
    ]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(seed: int) -> None:
        try:
            start.wait()
            results[seed] = np.asarray(tiny_engine.generate([request(seed)])[0])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (21, 22)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for hook in hooks:
            hook.remove()
    assert errors == []
    for seed, image in expected.items():
        assert np.array_equal(results[seed], image)
    owners = [owner for _, owner in events]
    runs = [owner for index, owner in enumerate(owners) if index == 0 or owners[index - 1] != owner]
    assert len(set(owners)) == 2
    assert len(runs) == 2, "one thread entered the pipeline while the other was inside it"
    for owner in runs:
        kinds = [kind for kind, who in events if who == owner]
        # Text encoder (prompt and unconditional) first, two UNet steps, the decoder last.
        assert kinds[0] == "enter"
        assert kinds[-1] == "exit"
        assert kinds.count("step") == 2


def test_generate_one_by_one_isolates_a_failing_item(tiny_engine: DiffusionEngine) -> None:
    calls = {"count": 0}

    def fail_on_second_item() -> bool:
        # With 2 steps each item asks 3 times (before the call, after each step); call 4 is item 2's first.
        calls["count"] += 1
        if calls["count"] == 4:
            raise RuntimeError("item failed")
        return False

    outcomes = tiny_engine.generate_one_by_one(
        [request(31), request(32), request(33)], should_cancel=fail_on_second_item
    )
    assert [outcome.request.job_id for outcome in outcomes] == ["job-31", "job-32", "job-33"]
    assert outcomes[1].image is None
    assert isinstance(outcomes[1].error, RuntimeError)
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.error is None
        assert outcome.image is not None
        reference = tiny_engine.generate([outcome.request])[0]
        assert np.array_equal(np.asarray(outcome.image), np.asarray(reference))


def test_generate_one_by_one_stops_on_cancellation(tiny_engine: DiffusionEngine) -> None:
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate_one_by_one([request(1), request(2)], should_cancel=lambda: True)


def test_tokenizer_is_a_copy_of_the_pipelines_own(tiny_engine: DiffusionEngine) -> None:
    fitting, own = tiny_engine.tokenizer, tiny_engine.pipeline.tokenizer
    assert fitting is not own
    assert type(fitting) is type(own)
    assert fitting.model_max_length == own.model_max_length == 77
    text = "a picture about asthma and the lungs"
    assert fitting(text).input_ids == own(text).input_ids
    assert tiny_engine.tokenizer is fitting  # one copy per engine


def test_unloaded_engine_refuses_to_generate(
    make_tiny_spec: Callable[..., ModelSpec], tiny_model_path: Path
) -> None:
    engine = DiffusionEngine(make_tiny_spec(tiny_model_path), device=torch.device("cpu"), dtype=torch.float32)
    assert not engine.loaded
    with pytest.raises(RuntimeError, match=r"not loaded; call load\(\) first"):
        engine.generate([request(1)])
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = engine.tokenizer


def test_compile_is_refused_off_cuda(make_tiny_spec: Callable[..., ModelSpec], tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="compile=True needs a CUDA device"):
        DiffusionEngine(
            make_tiny_spec(tiny_model_path), device=torch.device("cpu"), dtype=torch.float32, compile=True
        )


def test_load_warms_up_each_bucket_at_its_batch_cap(
    make_tiny_spec: Callable[..., ModelSpec], tiny_model_path: Path
) -> None:
    engine = DiffusionEngine(
        make_tiny_spec(tiny_model_path, batch_caps={64: 3, 128: 2}),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    batches: list[int] = []
    hook_target: list[object] = []

    engine.load(warm_up_buckets=[])
    hook = engine.pipeline.unet.register_forward_pre_hook(
        lambda module, args: batches.append(int(args[0].shape[0]))
    )
    hook_target.append(hook)
    try:
        engine.load(warm_up_buckets=[(64, 64, 1, 0.0), (128, 128, 1, 5.0)])
    finally:
        hook.remove()
    # Guidance 5 doubles the UNet batch (classifier-free guidance); guidance 0 does not.
    assert batches == [3, 4]


def test_model_folder_that_fails_to_load_raises(
    make_tiny_spec: Callable[..., ModelSpec], tmp_path: Path, tiny_model_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    engine = DiffusionEngine(make_tiny_spec(broken), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever safetensors raises, load must not succeed
        engine.load()
    assert not engine.loaded


# -- model registry ---------------------------------------------------------------------------------------


def test_allow_list_refuses_an_unknown_pipeline_class(tiny_model_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"'os\.system' is not allowed; use 'auto' or one of"):
        ModelSpec(name="evil", path=tiny_model_path, pipeline_class="os.system")
    with pytest.raises(ValidationError, match="not allowed"):
        ModelSpec(name="img2img", path=tiny_model_path, pipeline_class="StableDiffusionImg2ImgPipeline")
    assert {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "FluxPipeline",
    } <= ALLOWED_PIPELINE_CLASSES


def test_auto_pipeline_class_comes_from_the_folder_and_is_checked(
    make_tiny_spec: Callable[..., ModelSpec], tmp_path: Path, tiny_model_path: Path
) -> None:
    spec = make_tiny_spec(tiny_model_path)
    assert pipeline_class_name(spec) == "StableDiffusionPipeline"
    assert resolve_pipeline_class(spec).__name__ == "StableDiffusionPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline"}))
    with pytest.raises(ModelConfigError, match="'DiffusionPipeline', which is not allowed"):
        resolve_pipeline_class(make_tiny_spec(tmp_path))


def test_check_model_loads_a_small_model_for_real(
    make_tiny_spec: Callable[..., ModelSpec], tiny_model_path: Path
) -> None:
    result = check_model(make_tiny_spec(tiny_model_path))
    assert result.ok, result.problems
    assert result.loaded
    assert result.pipeline_class == "StableDiffusionPipeline"
    assert result.unet_or_transformer_parameters is not None
    assert result.unet_or_transformer_parameters > 500_000
    assert result.weight_bytes > 1_000_000


def test_check_model_checks_big_models_structurally(
    make_tiny_spec: Callable[..., ModelSpec], tmp_path: Path, tiny_model_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    result = check_model(make_tiny_spec(copy), quick_load_limit_bytes=0)
    assert result.ok, result.problems
    assert not result.loaded
    next((copy / "vae").glob("*.safetensors")).write_bytes(b"\x00" * 16)
    (copy / "unet" / "config.json").unlink()
    shutil.rmtree(copy / "text_encoder")
    problems = check_model(make_tiny_spec(copy), quick_load_limit_bytes=0).problems
    assert any("'unet' has no config file" in problem for problem in problems)
    assert any("weights vae/" in problem and "unreadable" in problem for problem in problems)
    assert any("'text_encoder' has no folder" in problem for problem in problems)


def test_check_model_reports_a_failed_real_load(
    make_tiny_spec: Callable[..., ModelSpec], tmp_path: Path, tiny_model_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    (copy / "unet" / "config.json").write_text("{not json")
    result = check_model(make_tiny_spec(copy))
    assert not result.ok
    assert not result.loaded
    assert result.problems[0].startswith("loading the pipeline failed")


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (lambda folder: shutil.rmtree(folder), "does not exist"),
        (lambda folder: (folder / "model_index.json").unlink(), "model_index.json does not exist"),
        (lambda folder: (folder / "model_index.json").write_text("{oops"), "not readable JSON"),
        (lambda folder: (folder / "model_index.json").write_text("[]"), "must hold a JSON object"),
        (
            lambda folder: (folder / "model_index.json").write_text(
                json.dumps({"_class_name": "FluxPipeline"})
            ),
            "differs from the folder's 'FluxPipeline'",
        ),
        (
            lambda folder: [weights.unlink() for weights in folder.rglob("*.safetensors")],
            "holds no weight files",
        ),
    ],
)
def test_check_model_reports_broken_folders(
    make_tiny_spec: Callable[..., ModelSpec], tmp_path: Path, tiny_model_path: Path, prepare, problem: str
) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    prepare(copy)
    result = check_model(make_tiny_spec(copy, pipeline_class="StableDiffusionPipeline"))
    assert not result.ok
    assert any(problem in found for found in result.problems), result.problems


def test_registry_from_dicts_and_lookups(tiny_model_path: Path) -> None:
    registry = ModelRegistry.from_dicts(
        [
            {"name": TINY_MODEL_NAME, "path": str(tiny_model_path), "is_test_model": True},
            {"name": "sdxl", "path": "/models/sdxl", "pipeline_class": "StableDiffusionXLPipeline"},
        ]
    )
    assert registry.names() == [TINY_MODEL_NAME, "sdxl"]
    assert len(registry) == 2
    assert "sdxl" in registry
    assert registry.get(TINY_MODEL_NAME).path == tiny_model_path
    with pytest.raises(KeyError, match=f"unknown model 'flux'; configured models: {TINY_MODEL_NAME}, sdxl"):
        registry.get("flux")
    with pytest.raises(ModelConfigError, match="configured twice"):
        ModelRegistry.from_dicts([{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}])
    with pytest.raises(ValidationError, match="Extra inputs"):
        ModelRegistry.from_dicts([{"name": "a", "path": "/x", "trust_remote_code": True}])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_caps": {}}, "at least one entry"),
        ({"batch_caps": {512: 0}}, "caps ≥ 1"),
        ({"default_width": 500}, "multiples of 8"),
        ({"name": "../escape"}, "String should match pattern"),
    ],
)
def test_model_spec_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate({"name": "m", "path": "/m", **changes})


def test_batch_cap_follows_the_smallest_bucket_that_fits() -> None:
    spec = ModelSpec(name="m", path=Path("/m"), batch_caps={1024: 2, 64: 16, 512: 8})
    assert spec.batch_cap_for(64, 64) == 16
    assert spec.batch_cap_for(64, 128) == 8
    assert spec.batch_cap_for(512, 512) == 8
    assert spec.batch_cap_for(768, 768) == 2
    assert spec.batch_cap_for(1024, 1024) == 2
    assert spec.batch_cap_for(2048, 2048) == 1


def test_prompts_fitted_while_a_batch_runs_never_break_the_batch(tiny_engine: DiffusionEngine) -> None:
    """The worker fits the next batch's prompts (engine.tokenizer) while the pipeline tokenizes the current
    one in its thread. With the pipeline's own tokenizer shared, batches failed now and then ("Sizes of
    tensors must match ... got size 77": 6 of 30 in a run) and were retried one job at a time."""
    from service.generation.text import fit_to_token_budget

    assert tiny_engine.tokenizer is not tiny_engine.pipeline.tokenizer
    long_text = "a friendly picture about the heart, the lungs and the kidneys " * 12
    stop = threading.Event()
    fitted: list[str] = []

    def fit_continuously() -> None:
        while not stop.is_set():
            fitted.append(fit_to_token_budget(long_text, tokenizer=tiny_engine.tokenizer))

    fitter = threading.Thread(target=fit_continuously)
    fitter.start()
    try:
        for round_ in range(15):
            requests = [
                ImageRequest(f"r{round_}-{k}", long_text[:200], None, k, 64, 64, 2, 5.0) for k in range(8)
            ]
            assert len(tiny_engine.generate(requests)) == 8
    finally:
        stop.set()
        fitter.join(timeout=30)
    assert fitted
    assert len(set(fitted)) == 1  # the copy fits the same way every time
