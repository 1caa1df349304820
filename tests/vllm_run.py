"""vLLM runs with kvpack's connector, in this process, one engine after another (run by tests/test_vllm.py with the
integration venv).

    python tests/vllm_run.py PLAN_JSON OUT_JSON

PLAN_JSON: ``{"checkpoint": DIR, "prompt": TEXT, "runs": [{"name": N, "store": DIR, "codec": C,
"codec_params": {...}}, ...]}``. For each run: an engine (SmolLM2 in-process on the CPU backend, vLLM's own prefix
cache off) with ``KvpackConnector`` over that disk store and codec, one greedy request, the connector's pending
saves flushed, the engine shut down (which also shuts the connector down, so the next engine makes its own). OUT_JSON
gets per run the prompt's token count, the generated token ids, the prompt tokens vLLM did not compute and the
connector's codec. vLLM's prefix cache is off, so the tokens it did not compute came from the store; a warm run in
a new process reads what an earlier process stored. The model runs in float32 (``DTYPE``) on every host: on AMX
hosts vLLM keeps bfloat16 KV in prepacked tiles the connector refuses, and elsewhere bfloat16 compute is several
times slower than float32 (docs/vllm.md); bfloat16 pages are served through the connector by the README line's test.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: The model dtype of these runs (module docstring).
DTYPE = "float32"


def one(checkpoint: str, prompt: str, run: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    transfer = {
        "kv_connector": "KvpackConnector",
        "kv_connector_module_path": "kvpack.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"store": f"file://{run['store']}", "codec": run["codec"],
                                      "codec_params": run.get("codec_params", {})},
    }
    llm = LLM(model=checkpoint, dtype=DTYPE, max_model_len=2048, enforce_eager=True, seed=0,
              enable_prefix_caching=False, kv_transfer_config=transfer)
    connector = get_kv_transfer_group()
    result = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0]
    connector.flush()
    out = {"name": run["name"], "prompt_tokens": len(result.prompt_token_ids),
           "output": list(result.outputs[0].token_ids), "cached_tokens": result.num_cached_tokens,
           "codec": connector.codec.codec_id, "fingerprint": connector.spec.fingerprint}
    llm.llm_engine.engine_core.shutdown()
    del llm, connector
    gc.collect()
    return out


def main() -> None:
    plan_file, out_file = sys.argv[1:3]
    plan = json.loads(Path(plan_file).read_text())
    results = [one(plan["checkpoint"], plan["prompt"], run) for run in plan["runs"]]
    Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
