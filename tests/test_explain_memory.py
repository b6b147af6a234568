"""Memory: perturbation methods chunk their perturbed copies, so a 224x224 DenseNet-169 with 1000 samples fits
the default budget. The peak is measured in a fresh process, so that earlier tests do not blur it, over the
first chunks of the call: the copies are built per chunk, so a method that materialised all 1000 copies (0.6
GB of input alone, tens of GB of activations) would show it before its first chunk returned."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import xailab
    from xailab.explain.batching import default_batch_size
    torch.set_num_threads(2)
    model = xailab.create_model("densenet169", in_channels=3, num_classes=2, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # the model and one forward pass: the baseline every method needs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches = []

    class Enough(Exception):
        pass

    def count(module, args):
        batches.append(args[0].shape[0])
        if len(batches) > 4:  # the target's forward pass, then 4 chunks of perturbed copies
            raise Enough

    handle = model.register_forward_pre_hook(count)
    params = {"rise": {"n_masks": 1000}, "occlusion": {"window": 8, "stride": 4}}.get(
        sys.argv[1], {"n_samples": 1000, "segments": "grid", "grid": 8}
    )
    try:
        xailab.explain(model, x, sys.argv[1], **params)
    except Enough:
        pass
    handle.remove()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024, "batches": batches,
                      "default": default_batch_size(x, grad=False)}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lime", "rise", "occlusion"])  # kernel_shap shares lime's sampler
def test_densenet169_at_224_with_1000_samples_stays_within_the_default_chunk_memory(method):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, method], capture_output=True, text=True, timeout=600, check=True
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(peak["batches"]) == 5 and max(peak["batches"][1:]) == peak["default"] == 2, peak
    assert peak["growth_mib"] < 1024, peak
