"""Evaluation harness: datasets (LongBench, musique_s, RULER), metrics, a resumable runner and a sweep.

    qcfuse data ruler --task mv --n 100 --out data/ruler_mv.jsonl
    qcfuse eval --dataset musique_s --baseline qcfuse --ratio 0.15 --size 100 --cache_dir .kv
    qcfuse sweep --dataset musique_s --methods cacheblend,qcfuse --ratios 0.05,0.15 --size 100
"""
from .datasets import DATASETS, Sample, load_dataset
from .metrics import f1_score, fidelity, rouge_l, string_match_all

__all__ = ["DATASETS", "Sample", "f1_score", "fidelity", "load_dataset", "rouge_l", "string_match_all"]
