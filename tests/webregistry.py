"""Shared by the web tests: a registry of real adapters (saved by PEFT on tiny Llamas) to browse."""

from __future__ import annotations

from pathlib import Path

from peft import LoHaConfig
from peft_saved import save_folders, save_peft

from hub.client import Hub
from hub.registry import Metric

SCRIPT_DESCRIPTION = "Style transfer <script>window.__pwned = 1</script> with <b>bold</b> claims & more"
METRICS = {  # ref: (accuracy on gsm8k:test, loss)
    "math-lora@1": (0.61, 1.25),
    "math-lora@2": (0.68, 1.0),
    "math-loha@1": (0.64, 1.1),
}


def make_registry(root: Path) -> Hub:
    """math-lora@1,2 (LoRA r4 then r8, @prod on 2), math-loha@1 (LoHa), style-ia3@1 (IA3 on a sibling base with
    the same shapes; its description holds HTML), blend@1 (the exact half-half sum of math-lora@1 and @2)."""
    folders = save_folders(root / "folders")
    folders["loha"] = save_peft(folders["base"], LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                root / "folders" / "loha", seed=4)
    hub = Hub(home=root / "home")
    for ref, folder, tags in (("math-lora@1", "lora4", ["math"]), ("math-lora@2", "lora8", ["math", "gsm8k"]),
                              ("math-loha@1", "loha", ["math", "lycoris"])):
        accuracy, loss = METRICS[ref]
        hub.register(folders[folder], name=ref.split("@")[0], base=folders["base"], tags=tags,
                     description="Solves grade-school arithmetic word problems" if "lora" in ref else None,
                     metrics=[Metric("accuracy", accuracy, "gsm8k", "test"), Metric("loss", loss)])
    hub.register(folders["ia3"], name="style-ia3", base=folders["sibling"], description=SCRIPT_DESCRIPTION,
                 tags=["style"])
    hub.alias("math-lora@2", "prod")
    from hub import compose

    compose(["math-lora@1", "math-lora@2"], [0.5, 0.5], hub=hub).register(hub, name="blend")
    return hub
