"""One vLLM run with kvpack's connector, in this process (run by tests/test_vllm.py with the integration venv).

    python tests/vllm_run.py CHECKPOINT STORE_DIR CODEC PROMPT_FILE OUT_JSON

Serves SmolLM2 in-process on the CPU backend with ``KvpackConnector`` over a disk store, generates greedily for the
prompt, and writes the generated token ids, vLLM's count of the prompt tokens it did not compute and the entries
now in the store to OUT_JSON. Every run is a new process, so vLLM's own prefix cache starts empty: tokens it did
not compute came from the store. The model runs in bfloat16, except on AMX hosts, where vLLM keeps bfloat16 KV in
prepacked tiles the connector refuses (docs/vllm.md): float32 there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    checkpoint, store_dir, codec, prompt_file, out = sys.argv[1:6]
    from vllm import LLM, SamplingParams

    transfer = {
        "kv_connector": "KvpackConnector",
        "kv_connector_module_path": "kvpack.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"store": f"file://{store_dir}", "codec": codec},
    }
    from kvpack.cpu import flags

    dtype = "float32" if "amx_bf16" in flags() else "bfloat16"
    llm = LLM(model=checkpoint, dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0,
              kv_transfer_config=transfer)
    prompt = Path(prompt_file).read_text()
    result = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0]
    engine = llm.llm_engine
    del llm, engine  # the connector's writer finishes its saves at exit
    import gc

    gc.collect()
    Path(out).write_text(json.dumps({
        "prompt_tokens": len(result.prompt_token_ids),
        "output": list(result.outputs[0].token_ids),
        "cached_tokens": result.num_cached_tokens,
    }))


if __name__ == "__main__":
    main()
