"""Data pruning: choose which text a pruned model is calibrated and recovered on.

    pool.py        the streamed pool of samples of a source, budgets, the selected.jsonl writer
    select.py      score (streamed, resumable), order, fill the budget, write + report
    random.py      the seeded baseline
    perplexity.py  a band of a reference model's perplexity (arXiv 2309.04564)
    cli.py         `prunekit data select` / `prunekit data report`
"""
