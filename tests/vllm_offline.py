"""Run by tests/test_vllm.py with the vLLM virtualenv's python: one `vllm.LLM` with the qcfuse connector, a fixed
series of greedy requests, and what came back (token ids, each request's kv_transfer_params, the connector's
Prometheus series after each request) written as JSON. The assertions live in the test."""
import argparse
import json
import os
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parents[1] / "examples" / "docs"
DOCS = [(DOCS_DIR / f"{name}.txt").read_text() for name in ("marie_curie", "great_barrier_reef")]
# 798 context tokens in a 826-token prompt: vLLM's prefix cache holds 6 full blocks (768) of a repeat, not all 798
PARTIAL_DOCS = [(DOCS_DIR / f"{name}.txt").read_text() for name in ("great_barrier_reef", "transistor")]
QUESTION = "In which year was the Great Barrier Reef Marine Park established?"
MAX_TOKENS = 24


def qcfuse_series(llm) -> dict:
    """The connector's counters (by tier where labelled) and histogram counts, from vLLM's own registry."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:qcfuse_"):
            name = m.name + (f"[{m.labels['tier']}]" if "tier" in m.labels else "")
            out[name] = m.count if hasattr(m, "count") else m.value
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis_url", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    import qcfuse
    from qcfuse.model.loader import resolve_model_dir

    connector = KVTransferConfig(kv_connector="QcfuseConnector", kv_connector_module_path="qcfuse.integrations.vllm",
                                 kv_role="kv_both", kv_connector_extra_config={"redis_url": args.redis_url})
    llm = LLM(model=str(resolve_model_dir("smollm2-135m")), dtype="float32", enforce_eager=True, max_model_len=4096,
              disable_log_stats=False, kv_transfer_config=connector)
    tokenizer = llm.get_tokenizer()                   # vLLM's own tokenizer object builds the prompts

    def fused(documents, method, ratio):
        return qcfuse.vllm_prompt(tokenizer, documents, QUESTION, method, ratio)

    ratio_one, reuse, qcf = fused(DOCS, "qcfuse", 1.0), fused(DOCS, "reuse", 0.0), fused(DOCS, "qcfuse", 0.15)
    reordered = fused(DOCS[::-1], "qcfuse", 0.15)
    partial = fused(PARTIAL_DOCS, "reuse", 0.0)
    tampered = dict(qcf.prompt, cache_salt="qcfuse-not-this-one")     # a salt no other request has used
    plain = {"prompt_token_ids": ratio_one.prompt_token_ids}
    series = [("plain", plain, None), ("ratio_one", ratio_one.prompt, ratio_one.sampling_extra_args),
              ("reuse", reuse.prompt, reuse.sampling_extra_args), ("qcfuse", qcf.prompt, qcf.sampling_extra_args),
              ("reordered", reordered.prompt, reordered.sampling_extra_args),
              ("repeat", reuse.prompt, reuse.sampling_extra_args),
              ("partial", partial.prompt, partial.sampling_extra_args),
              ("partial_repeat", partial.prompt, partial.sampling_extra_args),
              ("tampered", tampered, qcf.sampling_extra_args),
              ("plain_again", plain, None)]
    results = {"prompt_tokens": len(ratio_one.prompt_token_ids), "context_tokens": ratio_one.layout.context_len,
               "doc_tokens": ratio_one.layout.n_doc_tokens, "qcfuse_prompt_token_ids": qcf.prompt_token_ids,
               "partial_prompt_tokens": len(partial.prompt_token_ids),
               "partial_context_tokens": partial.layout.context_len}
    for name, prompt, extra_args in series:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=extra_args),
                           use_tqdm=False)[0]
        results[name] = {"token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
                         "kv_transfer_params": out.kv_transfer_params, "series": qcfuse_series(llm)}
    llm.llm_engine.do_log_stats()                     # flush what the periodic stats log has not printed yet
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":       # vllm.LLM spawns its engine core: the guard is required
    main()
