"""kalm-study: the KaLM-Embedding-V2 training recipe as a small, tested library behind the notebooks.

Module map, by layer (a module imports only from its own layer or the layers listed before it):

Foundation
    config          every knob of a run as validated dataclasses, filled from a profile YAML
    layout          every folder and file name of the repository, a run, a grid and a stage
    outputs         the one writer of run-level files (main process only, temp name + rename)
    instructions    the KaLM instruction format, the one place it is spelled
    manifest        git state, package versions, machine and data hashes for run manifests
    distributed     rank / world, the gathers for cross-device negatives (autograd-aware and plain), shards and row gathers

Model
    bidirectional   drop a decoder's causal mask (transformers' own switch)
    pooling         mean / last-token / cls pooling over real tokens
    encoder         backbone + pooling + L2 norm; save / reload as a sentence-transformers folder (with prompts)

Data
    data_cards      source / derived / reference YAML cards, loaded and checked
    sources         loaders named by source cards (packaged GCIDE and WordNet; hub datasets, also streamed)
    builders        source tables -> training examples and held-out evaluation payloads
    dedup           MinHash near-duplicate removal on datatrove over Parquet shards (local executor)
    eval_index      the curation's evaluation indexes (exact texts, LSH bands) as sorted 64-bit keys, memory-mapped
    curation        normalise, filter, de-duplicate, decontaminate, cap; write shards and cards
    shards          a training set as Parquet shards, read a batch at a time from their memory-mapped Arrow copy
    scale           streamed curation of hub sets to Parquet shards (datatrove filters and dedup)
    mining          hard negatives from the stage-1 model's ranking of a candidate pool; quality table

Training
    batching        task-homogeneous batch plan (pure function of sizes, batch, steps, seed)
    chunking        length-sorted forward chunks under a padded-token budget
    grad_cache      GradCache: big contrastive batches in a chunk's activation memory
    hard_negative_mixing   synthetic hard negatives per query (MoCHi-style)
    losses          KalmContrastiveLoss (InfoNCE, focal reweighting, mixing), MatryoshkaLoss
    training        one stage with accelerate: AdamW, schedule, exact resume
    soup            uniform and greedy parameter averaging

Evaluation
    mteb_tasks      local held-out tasks as real mteb task classes; standard mteb tasks
    evaluation      mteb model wrapper, mteb.evaluate, tidy results, compressed embeddings
    bootstrap       paired bootstrap over queries / pairs; model comparisons from run folders
    findings        each comparison's effect, 95% interval and one-sentence reading
    reference       published MTEB scores (reference card) beside a run
    ablations       grid of variants, paired deltas with confidence intervals, soup vs best single
    report          tables and figures the report notebook shows, read from a run folder
    hub             a run's instruction prompts for saved models; the model card (recipe, data, model-index)

Orchestration
    pipeline        one ``run_<stage>(profile, run_dir)`` per notebook
    runner          the notebook series under papermill into a run folder, report, manifest
    __main__        ``python -m kalm_lib run | train | grid``
"""
