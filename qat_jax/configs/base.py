"""Every configuration key of qat_jax, with its default, unit and meaning.

Other config files start from `get_config()` here and override a few fields; library code reads
keys directly (no `.get(k, default)`), so a key missing here is a bug. Budgets are in tokens;
step counts are derived by `qat_jax.phases.plan`, never typed twice.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of the parameter initialisation

    # --- model: Llama-2-style decoder (RMSNorm, RoPE, SwiGLU, no biases, tied embedding) ---
    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 4096  # pieces; must equal the tokenizer's vocabulary size
    m.d_model = 256  # residual stream width
    m.n_layers = 4  # decoder blocks
    m.n_heads = 4  # query heads; d_model must be divisible by n_heads
    m.n_kv_heads = 4  # key/value heads; < n_heads is grouped-query attention, must divide n_heads
    m.d_ff = 704  # SwiGLU hidden width (Llama: about 8/3 d_model, rounded)
    m.seq_len = 128  # tokens per training sequence (sequences are packed to seq_len + 1)
    m.rope_theta = 10000.0  # RoPE base period
    m.norm_eps = 1e-5  # RMSNorm epsilon
    m.init_std = 0.02  # std of the normal initialisation of every weight matrix
    m.tie_embeddings = True  # the output head is the input embedding; False: a head of its own
    # [V, D] (a Llama checkpoint with tie_word_embeddings=false)
    m.init_from = ""  # a Hugging Face Llama directory (config.json + safetensors) whose weights
    # start the run instead of the random initialisation; its shapes must be the config's
    m.compute_dtype = "auto"  # 'auto' (bf16 when compiled for GPU/TPU, f32 for CPU), 'float32',
    # 'bfloat16'; 'auto' follows the platform the step is compiled for, not the host's
    m.matmul_precision = "auto"  # the matmuls' operands with float32 compute: 'float32',
    # 'bfloat16' (rounded to bf16, products accumulated in f32; qat_jax/kernels.py: about 1.5x
    # faster than float32 on CPUs with bf16 dot instructions; it changes numerics,
    # docs/performance.md), or 'auto': bfloat16 on a CPU with bf16 dot instructions
    # (avx512_bf16, amx_bf16), else float32. A run's config.json records the value it started
    # with, and resumes with it wherever it runs
    m.attention = "auto"  # 'auto' (splash on TPU, cudnn on GPU in 16 bits, else xla), 'xla',
    # 'cudnn' (GPU, 16-bit), 'splash' (TPU Pallas kernel; interpreted on CPU)
    m.attention_block = 512  # splash attention's query and key/value block (tokens)
    m.remat_policy = "none"  # what a block keeps for the backward: 'none' (all), 'full'
    # (nothing), 'dots', 'dots_no_batch', 'attn_mlp_out', 'qkv_attn_mlp_out' (model.py)
    m.scan_layers = False  # the blocks under nn.scan (traced once: compile time flat in
    # depth); parameters stacked on a layer axis, so checkpoints differ from the loop's
    m.cpu_kernels = True  # on CPU, float32 operands through qat_jax/kernels.py's forms too
    # (1.14-1.25x faster at the tiny model's shapes; float rounding differs from XLA's own
    # forms, docs/performance.md). bfloat16 operands always take them. False: XLA's forms
    m.loss_chunk_len = 0  # sequence positions per cross-entropy chunk (the f32 logits of one
    # chunk at a time); 0 = all at once. Must divide seq_len

    # --- quant: weight-only fake quantization (ParetoQ quantizers, qat_jax/quant.py) ---
    c.quant = q = ml_collections.ConfigDict()
    q.bits = ml_collections.config_dict.placeholder(float)  # None = full precision; 1, 1.58, 2..8
    q.granularity = "channel"  # scale per 'channel' (output), per 'tensor', or per 'group'
    q.group_size = 0  # input weights per scale with granularity='group' (must divide d_model/d_ff)
    q.quantize_embedding = False  # also quantize the tied embedding / head, to max(bits, 4)
    q.scale_dtype = "float32"  # 'float16': scales rounded to fp16 in the forward pass (straight-
    # through backward), the grid llama.cpp serves: export --format=gguf is then bit-exact

    # --- qat: the FP -> QAT switch (METHOD.md section 1); read only when quant.bits is set ---
    c.qat = a = ml_collections.ConfigDict()
    a.fraction_policy = "auto"  # how the QAT share of the steps is chosen: 'fixed' (qat.fraction),
    # 'auto' (the paper's f*(S), METHOD.md section 2) or 'law' (the optimum of qat.law_file)
    a.fraction = ml_collections.config_dict.placeholder(float)  # 'fixed' only: a number in [0, 1]
    a.law_file = ""  # fraction_policy='law': the law.json of `qat-jax fit`
    a.min_fraction = 0.05  # 'auto' plans at least this (and uses it where S <= 1, f* undefined)
    a.fused_cooldown = True  # True: FP has no cooldown, QAT decays from the stable LR (fused)
    a.cooldown_frac = 1.0  # fraction of the QAT phase (after any re-warmup) in the LR cooldown
    a.warmup_frac = 0.1  # unfused only: fraction of the QAT phase re-warming the LR from 0
    a.peak_lr = ml_collections.config_dict.placeholder(float)  # unfused QAT peak LR; None: same
    a.reset_moments = False  # reset the weights' Adam moments at the switch (scales always fresh)
    # The quantizer scales' optimizer (docs/SCALES.md compares the choices by served loss):
    a.scale_update = "relative"  # 'relative': steps scaled by the scale (Adam on log alpha, to
    # first order); 'additive': Adam on alpha itself, as ParetoQ (kills channels at 4-8 bits)
    a.scale_lr_mult = 1.0  # the scales' LR as a multiple of the weights' LR
    a.scale_warmup_frac = 0.0  # fraction of the QAT phase ramping the scales' LR up from 0

    # --- schedule: warmup-stable-decay (WSD) learning rate over the token budget ---
    c.schedule = s = ml_collections.ConfigDict()
    s.total_tokens = 2_000_000  # training budget in tokens (steps = total_tokens / tokens_per_step)
    s.warmup_frac = 0.05  # fraction of the steps with linear LR warmup from 0
    s.cooldown_frac = 0.2  # fraction of the FP phase (at its end) in the LR cooldown; unused
    # when a fused QAT phase follows (the cooldown then happens inside QAT, see qat.cooldown_frac)
    s.cooldown_shape = "linear"  # shape of the cooldown; see qat_jax.optim.COOLDOWN_SHAPES
    s.final_lr_frac = 0.0  # LR at the end of the cooldown, as a fraction of the peak LR
    s.lowered_linear_start = 0.7  # 'lowered_linear': the LR factor the cooldown jumps to

    # --- optimizer: AdamW with decoupled weight decay and global-norm clipping ---
    c.optimizer = o = ml_collections.ConfigDict()
    o.peak_lr = 3e-3  # peak (stable-phase) learning rate
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.95  # Adam beta2
    o.cooldown_b2 = ml_collections.config_dict.placeholder(float)  # beta2 in cooldowns; None: b2
    o.eps = 1e-8  # Adam epsilon
    o.weight_decay = 0.01  # decoupled weight decay, applied to weight matrices only (not norms)
    o.grad_clip_norm = 1.0  # clip the global gradient norm to this; 0 disables clipping
    o.grad_accum_steps = 1  # micro-batches per optimizer step (must divide the per-device batch)

    # --- data: corpus, tokenizer, batches ---
    c.data = d = ml_collections.ConfigDict()
    d.source = "bible"  # 'bible' (embedded KJV), 'files' (text/jsonl glob), 'tfds', 'array_record'
    d.path = ""  # files: a glob; tfds: the dataset name; array_record: the `qat-jax prepare` dir
    d.text_key = "text"  # field holding the text in jsonl lines and tfds examples
    d.tfds_data_dir = ""  # tfds data_dir ('' = tfds default); the dataset must be prepared
    d.tokenizer = ""  # sentencepiece .model file; '' = train BPE on the train split (cached)
    d.val_every_nth_doc = 50  # every n-th document is held out for validation (never trained on)
    d.batch_size = 32  # sequences per optimizer step, over all devices and hosts
    d.seed = 0  # data order (shuffling) seed
    d.cache_dir = "~/.cache/qat_jax"  # trained tokenizers and tokenized corpora are cached here
    d.eval_batches = 8  # validation batches (of batch_size sequences) per evaluation

    # --- mesh: device axes (the product must equal the number of devices) ---
    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # data-parallel axis; -1 = all devices not used by fsdp and tensor
    ms.fsdp = 1  # fully-sharded data-parallel axis (parameters and batch sharded)
    ms.tensor = 1  # tensor-parallel axis (heads, d_ff and vocab sharded)

    # --- compile: XLA compilation (never changes a run's maths) ---
    c.compile = cp = ml_collections.ConfigDict()
    cp.cache_dir = "~/.cache/qat_jax/xla"  # XLA's persistent compilation cache ('' = off); a
    # JAX_COMPILATION_CACHE_DIR in the environment takes precedence
    cp.cache_min_compile_s = 1.0  # only compiles that took at least this long are cached

    # --- checkpoint: orbax, state plus data iterator ---
    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 200  # save every this many steps (and always at the end)
    ck.max_to_keep = 3  # checkpoints kept on disk (older ones are deleted)

    # --- logging ---
    c.logging = lg = ml_collections.ConfigDict()
    lg.every_steps = 10  # metrics.jsonl / TensorBoard / progress-bar cadence
    lg.eval_every_steps = 100  # validation cadence (and always at the end)
    lg.tensorboard = True  # write TensorBoard event files into the workdir
    return c
