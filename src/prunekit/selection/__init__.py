"""Data pruning: choose which text a pruned model is calibrated and recovered on.

    pool.py        the streamed pool of samples of a source, budgets, the selected.jsonl writer
    select.py      score (streamed, resumable), order, fill the budget, write + report
    random.py      the seeded baseline
    perplexity.py  a band of a reference model's perplexity (arXiv 2309.04564)
    embed.py       per-sample embeddings from the model's own hidden states, projected and stored compactly
    clusters.py    k-means concept clusters, quotas by cluster complexity, duplicates last (arXiv 2401.04578)
    entropy.py     a greedy minimum set cover of embedding neighbourhoods (after arXiv 2511.10561)
    statistic.py   the samples whose linear-layer input moments best match the pool's (calibration)
    donod.py       DONOD's model-intrinsic norm signals of one probe step, ranked by TOPSIS (arXiv 2504.14810)
    qtuning.py     Q-Tuning: error-uncertainty quadrants, token pruning of the loss mask (arXiv 2509.23873)
    paser.py       PASER: budget per concept cluster by the pruned model's capability loss (arXiv 2502.12594)
    windows.py     calibration selection: the `samples` windows of a larger pool (`--calib-select`)
    cli.py         `prunekit data select` / `prunekit data report`
"""

# The selectors' names, here and not beside their code so that the CLI lists them without importing torch
# (select.SELECTORS maps the same names to the modules; tests/test_selection.py keeps the two in step).
NAMES = ("random", "perplexity", "clusters", "entropy", "donod", "paser", "qtuning", "statistic")  # data select
# those that choose calibration windows (`prune --calib-select`, a recipe's calibration.select): the ones that
# need neither a second (pruned) model nor a training probe nor a loss mask to act on
CALIBRATION = ("random", "perplexity", "clusters", "entropy", "statistic")
