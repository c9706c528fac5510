"""Configuration: the shared base every `configs/*.py` starts from, and validation.

A config is an ml_collections `ConfigDict`, locked after `base()` so that a typo in a
config file (`c.optim.lrr = 1`) is an error, as it is on the command line
(`--config.optim.lrr=1`, rejected by `config_flags`). `validate` checks values that
types cannot (names of paths, samplers, datasets' divisibility) and names the key.
"""
from __future__ import annotations

import json
import math

import ml_collections
from ml_collections import config_dict

# Keys whose change makes an existing checkpoint unusable (shapes/structure of the
# state). Resuming a workdir with a different value is an error naming the key.
STRUCTURAL_KEYS = ("task", "model", "clip", "vae.network", "vae.latent_dim", "vae.width",
                   "vae.depth", "vae.likelihood", "autoencoder.channels",
                   "autoencoder.layers_per_block", "autoencoder.latent_channels",
                   "autoencoder.norm_groups", "autoencoder.mid_attention",
                   "latent.autoencoder", "latent.preset", "gan.generator", "gan.discriminator",
                   "gan.latent_dim", "gan.channels", "gan.d_norm", "gan.mlp_width",
                   "gan.mlp_depth", "gan.style_dim", "gan.mapping_depth",
                   "gan.patch_layers", "data.name", "data.image_size", "optim.name",
                   "superres.low_res", "text.encoder", "text.max_length",
                   "optim.trainable", "distill.teacher", "distill.teacher_step",
                   # distillation entries of the state (a target network, LPIPS, a
                   # discriminator) exist or not by these
                   "consistency.mode", "consistency.target_decay", "consistency.distance",
                   "adversarial.adversarial_weight",
                   # the fine-tuning tree's entries (adapters, embeddings, text encoder)
                   "finetune.method", "finetune.lora_rank", "finetune.lora_targets",
                   "finetune.lora_text_targets", "finetune.train_text_encoder",
                   "finetune.placeholders")
# Keys under a structural prefix that change compute only (a resumed run may switch
# them, e.g. turn on remat or bf16 compute to fit a bigger batch).
COMPUTE_ONLY_KEYS = ("model.remat", "model.attention_impl", "model.dtype", "model.dropout")


def base() -> ml_collections.ConfigDict:
  """The shared base config (all keys, with defaults). Returns a locked ConfigDict."""
  c = ml_collections.ConfigDict()
  c.task = "diffusion"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "sklearn_digits"          # embedded: sklearn_digits, mnist5k; or any prepared TFDS name
  c.data.data_dir = config_dict.placeholder(str)  # None: TFDS default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.split = "train"
  c.data.batch_size = 128                 # global, over all devices of all hosts
  c.data.random_flip = False
  c.data.image_size = 0                   # 0: native size; else center-crop + resize
  c.data.num_threads = 0                  # grain read threads (0: main thread)
  c.data.prefetch = 2
  # A subset of data.name (any dataset with labels): keep the examples whose label is in
  # `labels` (() = all), then the first `max_examples` of those in stored order (0 = all).
  c.data.labels = ()
  c.data.max_examples = 0
  # A second dataset (e.g. DreamBooth's class images, Ruiz et al. 2023): every process's
  # batch is half data.name, half this, with "paired" 0 / 1 ('' = off).
  c.data.paired_name = ""

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.channels = 64
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 4
  c.model.dropout = 0.0
  c.model.dtype = "float32"               # compute dtype (activations, matmuls)
  c.model.param_dtype = "float32"         # parameter (and optimizer-state) dtype
  c.model.class_conditional = True        # False: labels are ignored (unconditional model)
  c.model.guidance_input = False          # the CFG weight w is a network input (guidance distillation)
  c.model.remat = ""                      # '' | nothing | dots | dots_no_batch | everything (per block)
  c.model.attention_impl = config_dict.placeholder(str)  # None (XLA) | xla | cudnn
  # U-Net (ADM / DDPM++ family)
  c.model.scale_shift_norm = True         # AdaGN GroupNorm(h)(1+s)+b (ADM); False: h + Dense(emb) (DDPM)
  c.model.num_head_channels = 0           # > 0: heads = channels // this (ADM); 0: model.num_heads
  c.model.resblock_updown = False         # BigGAN-style residual down/up-sampling blocks (ADM)
  # DiT (Peebles & Xie 2023)
  c.model.variant = ""                    # S/2 … XL/8: sets hidden_size, depth, num_heads, patch_size
  c.model.hidden_size = 384
  c.model.depth = 12
  c.model.patch_size = 2
  c.model.mlp_ratio = 4.0
  c.model.scan = False                    # nn.scan over the DiT blocks (one compiled block)
  # Text conditioning (when config.text.encoder is set): cross | joint (DiT, MMDiT-style)
  c.model.text_attention = "cross"

  # Text: captions → byte-level tokens (data/text.py), the CLIP task, and the text
  # encoder that conditions diffusion.
  c.text = ml_collections.ConfigDict()
  c.text.max_length = 32                  # tokens incl. BOS/EOS (longer captions are cut)
  c.text.feature = "caption"              # the dataset's text feature (embedded digits: from labels)
  c.text.encoder = ""                     # diffusion conditioning: '' | clip | precomputed
  c.text.clip_workdir = config_dict.placeholder(str)  # a clip run (encoder='clip'; frozen)
  c.text.embedding_feature = "text_embedding"  # encoder='precomputed': dataset feature [M, D]
  # Caption templates of label-captioned datasets (the embedded digits), with the optional
  # fields {name} ("seven") and {number} ("7"), e.g. ('a handwritten <v>',); () = text.TEMPLATES.
  c.text.templates = ()

  # The CLIP task (config.task='clip'): text transformer + ViT, contrastive loss.
  c.clip = ml_collections.ConfigDict()
  c.clip.loss = "clip"                    # clip (softmax) | siglip (sigmoid)
  c.clip.embed_dim = 64
  c.clip.text_width = 64
  c.clip.text_depth = 2
  c.clip.text_heads = 4
  c.clip.vision_width = 64
  c.clip.vision_depth = 2
  c.clip.vision_heads = 4
  c.clip.patch_size = 2

  # Super-resolution (a cascade's upsampling stage): the denoiser also sees the image
  # downsampled to low_res × low_res and upsampled back, as extra input channels.
  c.superres = ml_collections.ConfigDict()
  c.superres.low_res = 0                  # 0: off
  c.superres.noise_aug = 0.0              # std of Gaussian noise on the low-res input (train and sample)

  # The GAN task (config.task='gan'): generator and discriminator (nets/gan.py), the
  # adversarial losses (losses/gan.py), d_steps discriminator updates per generator
  # update in one compiled step. model.class_conditional, model.dtype and
  # model.param_dtype apply to both networks; config.optim is the generator's
  # optimizer and, with gan.d_lr, the discriminator's.
  c.gan = ml_collections.ConfigDict()
  c.gan.loss = "non_saturating"           # minimax | non_saturating | hinge | lsgan | wgan
  c.gan.gp_weight = 0.0                   # λ of WGAN-GP's E[(‖∇D(x̂)‖ − 1)²] on interpolates
  c.gan.r1_weight = 0.0                   # γ of R1's γ/2·E[‖∇D(x_real)‖²]
  c.gan.d_steps = 1                       # discriminator updates per generator update
  c.gan.d_lr = config_dict.placeholder(float)  # None: optim.lr (else TTUR)
  c.gan.latent_dim = 64                   # z ~ N(0, I)
  c.gan.generator = "dcgan"               # mlp | dcgan | stylegan
  c.gan.discriminator = "dcgan"           # mlp | dcgan | patchgan
  c.gan.channels = 64                     # base width: G's last hidden, D's first layer
  c.gan.d_norm = "batch"                  # batch | layer | none (discriminator; not batch with gp/r1)
  c.gan.mlp_width = 256                   # mlp generator / discriminator
  c.gan.mlp_depth = 3
  c.gan.style_dim = 128                   # stylegan: w
  c.gan.mapping_depth = 4                 # stylegan: layers of the mapping network
  c.gan.patch_layers = 3                  # patchgan: strided layers (3: 70×70 receptive field)

  # The VAE task (config.task='vae'): a variational autoencoder as a generative model
  # (Kingma & Welling 2014): encoder q(z|x) = N(μ, σ²), decoder p(x|z), the β-weighted
  # ELBO; class-conditional when model.class_conditional (encoder and decoder see y).
  c.vae = ml_collections.ConfigDict()
  c.vae.network = "mlp"                   # mlp | conv (nets/vae.py)
  c.vae.latent_dim = 16
  c.vae.width = 256                       # mlp: hidden width; conv: base channels
  c.vae.depth = 2                         # mlp: hidden layers; conv: stride-2 levels
  c.vae.likelihood = "gaussian"           # gaussian (fixed σ) | gaussian_learned | bernoulli | logistic (discretised 8-bit)
  c.vae.sigma = 0.1                       # gaussian: decoder std on the [-1, 1] scale
  c.vae.beta = 1.0                        # β of the KL term (β-VAE, Higgins et al. 2017)
  c.vae.binarize = False                  # bernoulli: x ~ Bernoulli((x + 1)/2) each step (dynamic binarisation)

  # The latent autoencoder (config.task='autoencoder'): the KL-regularised autoencoder
  # of latent diffusion (Rombach et al. 2022; Esser et al. 2021's losses), the network
  # of nets/autoencoder.py (diffusers' AutoencoderKL layout). The discriminator is
  # config.gan's (gan.discriminator='patchgan', gan.patch_layers, gan.channels,
  # gan.d_norm, gan.d_lr, gan.r1_weight; gan.loss='hinge').
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.channels = (64, 128)      # block_out_channels: f = 2^(len − 1)
  c.autoencoder.layers_per_block = 1
  c.autoencoder.latent_channels = 4
  c.autoencoder.norm_groups = 32
  c.autoencoder.mid_attention = True
  c.autoencoder.reconstruction = "l1"     # l1 | l2
  c.autoencoder.perceptual_weight = 0.0   # LPIPS weight (needs lpips_weights)
  c.autoencoder.lpips_weights = config_dict.placeholder(str)  # LPIPS .npz (nets/lpips.py)
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.disc_weight = 0.5         # adversarial weight (× the adaptive λ)
  c.autoencoder.disc_start = 0            # step at which the discriminator (and its loss) switch on
  c.autoencoder.adaptive_weight = True    # λ = ‖∇L_rec‖ / (‖∇L_adv‖ + δ) at the decoder's last layer
  c.autoencoder.adaptive_max = 1e4        # clamp of λ (latent-diffusion's calculate_adaptive_weight)

  # Latent diffusion: the diffusion task in the latent space of a frozen autoencoder.
  c.latent = ml_collections.ConfigDict()
  c.latent.autoencoder = ""               # '' (pixel space) | workdir of a vae/autoencoder run | diffusers AutoencoderKL .safetensors
  c.latent.preset = ""                    # a .safetensors file's architecture: sd | sdxl | flux
  c.latent.scale = config_dict.placeholder(float)  # None: the latent cache's or autoencoder's
  c.latent.shift = config_dict.placeholder(float)  # None: the latent cache's or autoencoder's

  # The classifier task (config.task='classifier'): the U-Net's encoder with the
  # config.model size keys, trained on x_t of config.diffusion's path (classifier
  # guidance) or on clean images.
  c.classifier = ml_collections.ConfigDict()
  c.classifier.noise_conditional = True   # False: clean images only (t = 0)

  # Distillation (config.task = progressive | consistency | guidance_distillation |
  # adversarial_distillation; docs/distillation.md): a student with the teacher run's
  # model, diffusion, data, text and latent sections (checked), initialised from it.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""                  # workdir of the teacher (a diffusion or distillation run)
  c.distill.teacher_step = config_dict.placeholder(int)  # None: its latest checkpoint
  c.distill.teacher_params = "ema"        # ema | raw
  c.distill.init = "teacher"              # teacher (the student starts as the teacher) | random
  c.distill.guidance = config_dict.placeholder(float)  # CFG w of the teacher's targets; None: the teacher's sample.guidance

  # --- progressive distillation (Salimans & Ho 2022) -------------------------------
  c.progressive = ml_collections.ConfigDict()
  c.progressive.weighting = "truncated_snr"  # truncated_snr: max(SNR, 1) | snr_plus_one | uniform (x̂₀-space loss)

  # --- guidance distillation (Meng et al. 2023) ------------------------------------
  c.guidance_distillation = ml_collections.ConfigDict()
  c.guidance_distillation.w_min = 0.0     # w ~ U[w_min, w_max] per example
  c.guidance_distillation.w_max = 4.0

  # --- consistency distillation / training (Song et al. 2023) ----------------------
  c.consistency = ml_collections.ConfigDict()
  c.consistency.mode = "distillation"     # distillation (CD: the teacher's PF-ODE step, CM Alg. 2) | training (CT: no teacher, CM Alg. 3)
  c.consistency.num_scales = 18           # N grid points t_min = t_1 < … < t_N = 1 (schedule='fixed'; CM's CIFAR-10 CD: 18)
  c.consistency.schedule = "fixed"        # fixed (N, μ) | cm (CT's N(k), μ(k), CM App. C) | ict (N doubling every K' steps, iCT)
  c.consistency.s0 = config_dict.placeholder(int)  # N(k)'s start: None = 2 (cm) | 10 (ict)
  c.consistency.s1 = config_dict.placeholder(int)  # N(k)'s end: None = 150 (cm) | 1280 (ict)
  c.consistency.sigma_min = 0.002         # σ = b/a at t_min, the boundary f(x, t_min) = x (discrete path: ≥ σ(1/T))
  c.consistency.sigma_max = 80.0          # σ of the grid's top (EDM ρ-spacing; the top point is pinned to t = 1)
  c.consistency.rho = 7.0                 # ρ of the grid in σ (Karras et al. 2022, eq. 5)
  c.consistency.sigma_data = 0.5          # σ_d of c_skip, c_out
  c.consistency.solver = "heun"           # heun | euler: the teacher's one PF-ODE step t_{n+1} → t_n (CD)
  c.consistency.target_decay = 0.0        # μ of the target θ⁻ ← μ·θ⁻ + (1 − μ)·θ (cm: μ₀); 0: θ⁻ = stopgrad(θ) (iCT)
  c.consistency.distance = "pseudo_huber"  # l2 | l1 (means over dims) | pseudo_huber (iCT) | lpips (CM; needs lpips_weights)
  c.consistency.huber_c = config_dict.placeholder(float)  # pseudo_huber's c; None: 0.00054·sqrt(d) (iCT)
  c.consistency.lpips_weights = config_dict.placeholder(str)  # LPIPS .npz (nets/lpips.py) for distance='lpips'
  c.consistency.weighting = "uniform"     # λ(t_n): uniform | ict (1/(σ_{n+1} − σ_n))
  c.consistency.time_sampling = "uniform"  # n: uniform over the grid's pairs | lognormal (iCT's, over the pairs)
  c.consistency.lognormal_mean = -1.1     # P_mean of the lognormal over σ (iCT)
  c.consistency.lognormal_std = 2.0       # P_std

  # --- adversarial diffusion distillation (Sauer et al. 2024) ----------------------
  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.distill_weight = 2.5      # λ of L = w_adv·L_adv + λ·L_distill (ADD: 2.5)
  c.adversarial.adversarial_weight = 1.0  # w_adv; 0: no discriminator (distillation loss only)
  c.adversarial.distill_weighting = "a_t"  # c(t) of the distillation loss: a_t (ADD's exponential weighting) | uniform
  c.adversarial.teacher_t_min = 0.02      # the teacher's re-noising time t ~ U[t_min, t_max] (snapped on a discrete path)
  c.adversarial.teacher_t_max = 1.0

  # Fine-tuning (config.task='finetune'; docs/finetuning.md): a diffusion run's config with
  # its network from config.init.from_workdir (init.map = (('^', 'denoiser/'),)), and
  # what trains: LoRA adapters, placeholder-token embeddings (textual inversion), or
  # every weight of the denoiser and its text encoder. Plain fine-tuning and full
  # DreamBooth are config.task='diffusion' with config.init (+ data.paired_name).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.method = "lora"              # lora | textual_inversion | full (the denoiser and, with train_text_encoder, the text encoder)
  c.finetune.lora_rank = 4                # r
  c.finetune.lora_alpha = config_dict.placeholder(float)  # α of (α/r)·BA; None: r
  c.finetune.lora_dropout = 0.0           # dropout on the adapters' input
  # Module paths (re.search) of the adapted Dense / DenseGeneral / Conv layers: the
  # attention projections of the U-Net (SelfAttention2D_i/qkv|out, Attention_0/q|kv|proj)
  # and the DiT (attn/qkv|proj, cross_attn/q|kv|proj); add e.g. 'mlp/fc[12]$' for MLPs.
  c.finetune.lora_targets = (r"(^|/)(qkv|q|kv|out|proj)$",)
  c.finetune.lora_text_targets = (r"^text/.*attn/(qkv|proj)$",)  # of the clip text encoder
  c.finetune.train_text_encoder = False   # lora: adapters on the text encoder too; full: its weights
  c.finetune.placeholders = 0             # learned tokens <v0>..<v{K-1}> (textual inversion: ≥ 1)
  c.finetune.initializer = ""             # a word whose tokens' mean embedding starts each placeholder ('' : N(0, 0.02²))

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.path = "flow"               # flow | vp_discrete | vp_linear | vp_cosine | sub_vp | ve | edm
  c.diffusion.prediction = "velocity"     # velocity | eps | x | v | score | edm
  c.diffusion.num_steps = 1000            # T of discrete paths
  c.diffusion.beta_schedule = "linear"    # linear | cosine (vp_discrete)
  c.diffusion.time_sampling = "uniform"   # uniform | logit_normal | discrete
  c.diffusion.t_min = 0.0
  c.diffusion.logit_mean = 0.0
  c.diffusion.logit_std = 1.0
  c.diffusion.time_shift = 1.0
  c.diffusion.label_dropout = 0.1         # p(∅) for classifier-free guidance
  c.diffusion.beta_min = 0.1              # vp_linear, sub_vp
  c.diffusion.beta_max = 20.0
  c.diffusion.sigma_min = 0.01            # ve (edm: 0.002)
  c.diffusion.sigma_max = 50.0            # ve (edm: 80)
  c.diffusion.rho = 7.0                   # edm
  c.diffusion.sigma_data = 0.5            # edm preconditioning
  c.diffusion.loss_weight = "uniform"     # uniform | snr | min_snr | edm | vlb
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.prior_weight = 1.0          # λ of L_instance + λ·L_prior on paired batches (data.paired_name; DreamBooth)

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "euler"              # euler | heun | ddim | ddpm | dpm_solver_2m | dpm_solver_3m | unipc | ipndm | consistency | sde | pc | edm | annealed_langevin
  c.sample.num_steps = 50
  c.sample.guidance = 1.0                 # w in (1 + w)·f(y) − w·f(∅); 0 = off
  c.sample.clip_x0 = False
  c.sample.spacing = config_dict.placeholder(str)  # None: the sampler's default | uniform | karras | logsnr
  # An explicit grid t_0 = 1 > ... > t_N = 0, e.g. --config.sample.times='(1.0,0.6,0.3,0.0)':
  # overrides spacing; num_steps must be len(times) − 1.
  c.sample.times = config_dict.placeholder(tuple)
  # Sampler options: config.sample.<sampler> holds exactly the keyword arguments of
  # `samplers.<sampler>` beyond the common ones, passed to it as they are.
  c.sample.ddim = ml_collections.ConfigDict({"eta": 0.0})
  c.sample.ddpm = ml_collections.ConfigDict({"variance": "small"})  # small (β̃_t) | large (β_t)
  c.sample.pc = ml_collections.ConfigDict({"snr": 0.16, "corrector_steps": 1})  # Langevin corrector
  c.sample.edm = ml_collections.ConfigDict({"s_churn": 0.0})  # S_churn (0 = deterministic)
  c.sample.unipc = ml_collections.ConfigDict({"order": 3, "variant": "bh2"})  # order ≤ 3; bh1 | bh2
  c.sample.ipndm = ml_collections.ConfigDict({"order": 4})  # Adams–Bashforth order ≤ 4
  c.sample.lora_scale = 1.0               # s of W + (α/r)·s·BA (LoRA runs; 0 = the base model)
  c.sample.per_class = 8                  # columns of the training-time sample grid (0: no grids)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"             # cosine | constant (after linear warmup)
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.0              # cosine decays to lr * min_lr_ratio
  c.optim.grad_clip = 1.0                 # global-norm clipping; 0 = off
  # Regexes over parameter paths (re.search, e.g. 'attn/'): only matching parameters
  # train and have optimizer state; () = all of them.
  c.optim.trainable = ()

  # Start from another run's parameters (fine-tuning; training/warmstart.py): its EMA or
  # raw parameters, a fresh optimizer, step 0. Paths are matched after `map`'s regex
  # rewrites; new or reshaped parameters need a rule: init | grow | grow_zeros |
  # grow_mean | grow_last (by this run's path), drop (by the base run's path).
  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = ""                # '' (a fresh initialisation) | workdir of the base run
  c.init.step = config_dict.placeholder(int)  # None: its latest checkpoint
  c.init.params = "ema"                   # ema | raw
  c.init.map = ()                         # ((regex, replacement), ...) over the base run's paths
  c.init.rules = ()                       # ((regex, rule), ...)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.sample_every = 0                # 0 = only at the end
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.ema_decay = 0.999
  c.train.on_nonfinite = "skip"           # skip (keep the old state) | stop (raise)
  c.train.max_nonfinite = 100             # 'skip': stop after this many non-finite steps in a row (0 = never)
  c.train.allow_changes = ()              # resume despite a change of these keys (loop.GUARDED_KEYS)
  c.train.profile_steps = ()              # (first, last): jax.profiler trace of these steps → <workdir>/tensorboard
  c.train.parallel = "jit"                # jit (sharded over the mesh) | pmap (one program per device)

  # Evaluation (`diffusion-jax-evaluate` defaults; every > 0 also runs it from the
  # training loop). Sample metrics need a feature network: a classifier run.
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0                        # steps between evaluations in the loop; 0 = never
  c.eval.on_error = "stop"                # an evaluation inside training fails: stop (cleanly, saved) | continue
  c.eval.metrics = ("fd", "kid", "pr", "acc")  # fd | kid | pr | acc | is | clip_score | bpd_vlb | bpd_ode | bpd_elbo | bpd_iwae | psnr | ssim | lpips | rfd
  c.eval.num_samples = 1000
  c.eval.batch_size = 256                 # global generation batch
  c.eval.seed = 0                         # sample i uses fold_in(key(seed), i)
  c.eval.feature_workdir = config_dict.placeholder(str)  # classifier run (domain features)
  c.eval.inception_weights = config_dict.placeholder(str)  # FID Inception-v3 .pth / .npz
  c.eval.pixel_features = False           # also the raw pixels as features ('*_pixels'; small images)
  c.eval.clip_workdir = config_dict.placeholder(str)  # clip run for clip_score (None: text.clip_workdir)
  c.eval.ref_stats_dir = config_dict.placeholder(str)  # Inception ref stats (None: <workdir>/eval/ref_stats)
  c.eval.reference_split = "test"
  c.eval.floor_split = "train"
  c.eval.likelihood_images = 1000
  c.eval.likelihood_steps = 100
  c.eval.iwae_samples = 64                # k of the IWAE bound (bpd_elbo, bpd_iwae)
  c.eval.lpips_weights = config_dict.placeholder(str)  # LPIPS .npz for the lpips metric

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                        # -1: all devices not used by other axes
  c.mesh.fsdp = 1                         # parameter-sharding axis size
  c.mesh.fsdp_min_size = 2 ** 14          # smaller arrays stay replicated
  # big_vision-style rules: ((regex, spec), ...); the first regex that re.search-es a
  # state leaf's path ('params/blocks_3/attn/qkv/kernel', also matching its EMA and
  # optimizer moments) gives its PartitionSpec as a tuple of axis names / None
  # ('fsdp', None); unmatched leaves get the automatic rule (largest divisible axis).
  c.mesh.rules = ()

  c.lock()
  return c


_CHOICES = {
    "task": ("diffusion", "classifier", "clip", "gan", "vae", "autoencoder", "progressive",
             "guidance_distillation", "consistency", "adversarial_distillation", "finetune"),
    "finetune.method": ("lora", "textual_inversion", "full"),
    "distill.teacher_params": ("ema", "raw"),
    "init.params": ("ema", "raw"),
    "distill.init": ("teacher", "random"),
    "progressive.weighting": ("truncated_snr", "snr_plus_one", "uniform"),
    "consistency.mode": ("distillation", "training"),
    "consistency.schedule": ("fixed", "cm", "ict"),
    "consistency.solver": ("heun", "euler"),
    "consistency.distance": ("l2", "l1", "pseudo_huber", "lpips"),
    "consistency.weighting": ("uniform", "ict"),
    "consistency.time_sampling": ("uniform", "lognormal"),
    "adversarial.distill_weighting": ("a_t", "uniform"),
    "vae.network": ("mlp", "conv"),
    "vae.likelihood": ("gaussian", "gaussian_learned", "bernoulli", "logistic"),
    "autoencoder.reconstruction": ("l1", "l2"),
    "latent.preset": ("", "sd", "sdxl", "flux"),
    "model.name": ("unet", "dit"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("", "nothing", "dots", "dots_no_batch", "everything"),
    "model.attention_impl": (None, "xla", "cudnn"),
    "model.text_attention": ("cross", "joint"),
    "text.encoder": ("", "clip", "precomputed"),
    "clip.loss": ("clip", "siglip"),
    "gan.loss": ("minimax", "non_saturating", "hinge", "lsgan", "wgan"),
    "gan.generator": ("mlp", "dcgan", "stylegan"),
    "gan.discriminator": ("mlp", "dcgan", "patchgan"),
    "gan.d_norm": ("batch", "layer", "none"),
    "diffusion.path": ("flow", "vp_discrete", "vp_linear", "vp_cosine", "sub_vp", "ve", "edm"),
    "diffusion.prediction": ("velocity", "eps", "x", "v", "score", "edm"),
    "diffusion.loss_weight": ("uniform", "snr", "min_snr", "edm", "vlb"),
    "diffusion.beta_schedule": ("linear", "cosine"),
    "diffusion.time_sampling": ("uniform", "logit_normal", "discrete"),
    "sample.sampler": ("euler", "ddpm", "ddim", "heun", "dpm_solver_2m", "dpm_solver_3m",
                       "unipc", "ipndm", "consistency", "sde", "pc", "edm", "annealed_langevin"),
    "sample.ddpm.variance": ("small", "large"),
    "sample.spacing": (None, "uniform", "karras", "logsnr"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("cosine", "constant"),
    "train.on_nonfinite": ("skip", "stop"),
    "eval.on_error": ("stop", "continue"),
    "train.parallel": ("jit", "pmap"),
}
_POSITIVE = ("data.batch_size", "train.num_steps", "train.log_every", "train.keep_checkpoints",
             "diffusion.num_steps", "sample.num_steps", "model.channels", "eval.num_samples",
             "eval.batch_size", "eval.likelihood_images", "eval.likelihood_steps",
             "gan.d_steps", "gan.latent_dim", "gan.channels", "gan.mlp_width", "gan.mlp_depth",
             "gan.style_dim", "gan.mapping_depth", "gan.patch_layers",
             "eval.iwae_samples", "vae.latent_dim", "vae.width", "vae.depth", "vae.sigma", "vae.beta",
             "autoencoder.layers_per_block", "autoencoder.latent_channels",
             "autoencoder.norm_groups", "consistency.num_scales", "consistency.sigma_min",
             "consistency.sigma_max", "consistency.rho", "consistency.sigma_data",
             "consistency.lognormal_std")


def get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config) -> None:
  """Raises ValueError naming the first invalid key. Unknown keys are caught by the lock."""
  known = set(base().keys())
  extra = set(config.keys()) - known
  if extra:
    raise ValueError(f"unknown top-level config key(s): {sorted(extra)}")
  for key, value in _flatten(json.loads(to_json(config))).items():
    values = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      raise ValueError(f"config.{key}={value!r} must be finite")
  for key, choices in _CHOICES.items():
    if get(config, key) not in choices:
      raise ValueError(f"config.{key}={get(config, key)!r}: expected one of {list(choices)}")
  for key in _POSITIVE:
    if get(config, key) <= 0:
      raise ValueError(f"config.{key}={get(config, key)!r} must be > 0")
  for key in ("train.checkpoint_every", "train.sample_every", "train.max_nonfinite", "optim.warmup_steps", "eval.every",
              "sample.per_class",
              "superres.low_res", "superres.noise_aug", "gan.gp_weight", "gan.r1_weight",
              "autoencoder.perceptual_weight", "autoencoder.kl_weight",
              "autoencoder.disc_weight", "autoencoder.disc_start"):
    if get(config, key) < 0:
      raise ValueError(f"config.{key}={get(config, key)!r} must be >= 0")
  if not 0 <= config.diffusion.label_dropout < 1:
    raise ValueError(f"config.diffusion.label_dropout={config.diffusion.label_dropout} "
                     "must be in [0, 1)")
  _validate_data_subsets(config)
  _validate_train(config)
  if config.diffusion.time_sampling == "discrete" and config.diffusion.path != "vp_discrete":
    raise ValueError("config.diffusion.time_sampling='discrete' needs "
                     "config.diffusion.path='vp_discrete'")


def _validate_train(config) -> None:
  """train.profile_steps and train.allow_changes."""
  profile = config.train.profile_steps
  if profile and not (isinstance(profile, (tuple, list)) and len(profile) == 2
                      and all(isinstance(s, int) and not isinstance(s, bool) for s in profile)
                      and 1 <= profile[0] <= profile[1]):
    raise ValueError(f"config.train.profile_steps={profile!r} must be () or (first, last) "
                     "with 1 <= first <= last (steps counted from 1)")
  allow = config.train.allow_changes
  if not isinstance(allow, (tuple, list)) or not all(isinstance(k, str) for k in allow):
    raise ValueError(f"config.train.allow_changes={allow!r} must be a tuple of config keys, "
                     "e.g. ('seed', 'data.batch_size')")


def _validate_data_subsets(config) -> None:
  """data.labels, data.max_examples, data.paired_name and text.templates (each against
  its dataset when the pipeline opens it)."""
  d = config.data
  labels = d.labels
  if not isinstance(labels, (tuple, list)) or not all(
      isinstance(y, int) and not isinstance(y, bool) and y >= 0 for y in labels):
    raise ValueError(f"config.data.labels={labels!r} must be a tuple of class indices >= 0 "
                     "(() = all)")
  if d.max_examples < 0:
    raise ValueError(f"config.data.max_examples={d.max_examples} must be >= 0 (0 = all)")
  if not isinstance(d.paired_name, str):
    raise ValueError(f"config.data.paired_name={d.paired_name!r} must be a dataset name or "
                     "path ('' = off)")
  if d.paired_name and d.batch_size % 2:
    raise ValueError(f"config.data.batch_size={d.batch_size} must be even with "
                     f"config.data.paired_name={d.paired_name!r} (half of every batch "
                     "comes from each dataset)")
  templates = config.text.templates
  if not isinstance(templates, (tuple, list)) or not all(isinstance(t, str) for t in templates):
    raise ValueError(f"config.text.templates={templates!r} must be a tuple of strings "
                     "(() = data.text.TEMPLATES)")


def to_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


# Keys renamed since runs were first written (old name → new name): saved configs of
# older runs are read under the new names.
RENAMED = {"sample.ddim_eta": "sample.ddim.eta", "sample.ddpm_variance": "sample.ddpm.variance",
           "sample.pc_snr": "sample.pc.snr", "sample.pc_corrector_steps": "sample.pc.corrector_steps",
           "sample.edm_churn": "sample.edm.s_churn"}


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json`, merged onto `base()` so the result has every key (keys of
  `RENAMED` are read under their new names)."""
  c = base()
  c.unlock()
  flat = {RENAMED.get(k, k): v for k, v in _flatten(json.loads(text)).items()}
  c.update_from_flattened_dict(flat)
  c.lock()
  return c


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = tuple(v) if isinstance(v, list) else v
  return out


def diff(saved, current, keys=None) -> list[str]:
  """'key: checkpoint has A, config has B' for every dotted key whose value differs
  between two configs (only those that `keys(key)` accepts, when given)."""
  saved_flat = _flatten(json.loads(to_json(saved)))
  cur_flat = _flatten(json.loads(to_json(current)))
  return [f"{key}: checkpoint has {saved_flat.get(key)!r}, config has {cur_flat.get(key)!r}"
          for key in sorted(set(saved_flat) | set(cur_flat))
          if (keys is None or keys(key)) and saved_flat.get(key) != cur_flat.get(key)]


def structural_diff(saved, current) -> list[str]:
  """Dotted structural keys whose values differ between two configs."""
  return diff(saved, current, lambda key: key not in COMPUTE_ONLY_KEYS and any(
      key == s or key.startswith(s + ".") for s in STRUCTURAL_KEYS))
