//! `flint train`: the GPT training loop, reading top to bottom: settings, tokenizer, model,
//! data, optimizer, then for each step: micro-batches (forward, loss, backward), clipping,
//! update, logging, evaluation, checkpoint.

pub mod checkpoint;
pub mod config;
pub(crate) mod resume;

use crate::amp::GradScaler;
use crate::data::{self, DataOrder, Loader, LoaderState, Source, Tokenizer, Tokens};
use crate::device::{self, DeviceRequest};
use crate::generate::{generate, Sampling};
use crate::hf;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::run::folder;
use crate::run::metrics::{LossScaling, MetricsWriter};
use crate::run::tensorboard::{wall_time_now, EventWriter};
use crate::schedule::lr_at;
use anyhow::{anyhow, bail, Context, Result};
use config::{TrainConfig, TrainOptions};
use flint_backend::{Backend, Precision};
use flint_model::gpt::{self, Gpt, GptConfig};
use flint_model::BatchShape;
use resume::{
    changed_settings, finished, refuse_changes_on_resume, same_model, same_tokenizer, train_further,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The embedded default corpus (see `crates/train/data/README.md`).
pub const DEFAULT_CORPUS: &str = include_str!("../../data/tinyshakespeare.txt");

/// What the loop reports as it goes; the command line prints it.
pub trait Observer {
    fn started(&mut self, info: &Started);
    fn step(&mut self, m: &StepMetrics);
    fn eval(&mut self, step: u64, val_loss: f32);
    fn checkpoint(&mut self, dir: &Path);
    fn warn(&mut self, message: &str);
}

pub struct Started {
    pub run: PathBuf,
    /// The device and precision: `cpu, fp32`, `cpu, fp32 (no GPU: <why>)` or
    /// `cuda:0 (NVIDIA H200, sm_90, 139 GiB), bf16`.
    pub device: String,
    pub parameters: usize,
    pub model: GptConfig,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub first_step: u64,
    pub steps: u64,
    pub plan: String,
}

pub struct StepMetrics {
    pub step: u64,
    pub steps: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

pub struct Finished {
    pub run: PathBuf,
    pub last_step: u64,
    pub interrupted: bool,
    pub first_val_loss: Option<f32>,
    pub last_val_loss: Option<f32>,
    pub sample: Option<String>,
}

/// Validation batches per evaluation (at most).
const EVAL_BATCHES: usize = 20;

fn model_config(cfg: &TrainConfig, vocab: usize) -> Result<GptConfig> {
    let preset = cfg.preset.as_deref().unwrap_or("tiny");
    let mut m = GptConfig::preset(preset).map_err(|e| anyhow!("--preset: {e}"))?;
    m.vocab_size = vocab;
    m.n_layer = cfg.n_layer.unwrap_or(m.n_layer);
    m.n_embd = cfg.n_embd.unwrap_or(m.n_embd);
    m.n_head = cfg.n_head.unwrap_or(m.n_head);
    m.n_positions = cfg.n_positions.unwrap_or(m.n_positions);
    m.n_inner = cfg.n_inner.or(m.n_inner);
    m.dropout = cfg.dropout as f32;
    // The model's own check speaks in its config's names; say which flags set them.
    m.validate().map_err(|e| {
        let given = [
            ("--n-layer", cfg.n_layer),
            ("--n-embd", cfg.n_embd),
            ("--n-head", cfg.n_head),
            ("--n-positions", cfg.n_positions),
            ("--n-inner", cfg.n_inner),
        ]
        .iter()
        .filter_map(|(flag, v)| v.map(|v| format!("{flag} {v}")))
        .collect::<Vec<_>>();
        if given.is_empty() {
            anyhow!("--preset {preset}: {e}")
        } else {
            anyhow!(
                "the model (--preset {preset} with {}): {e}",
                given.join(", ")
            )
        }
    })?;
    fits_in_memory(&m)?;
    Ok(m)
}

/// Refuses a model whose parameters and AdamW moments cannot fit in the memory available:
/// allocating it would end in the kernel's out-of-memory kill rather than an error. 16 bytes per
/// parameter is a floor, not the whole need: on the CPU the gradients, and on a GPU the copies a
/// checkpoint downloads (parameters and both moments), come on top of the initial values.
fn fits_in_memory(m: &GptConfig) -> Result<()> {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let parameters = m.parameters().map_or(f64::INFINITY, |n| n as f64);
    match crate::device::host_memory_available() {
        Some(free) if parameters * 16.0 > free as f64 => bail!(
            "the model has {:.0} million parameters, which with AdamW's state need at least {:.1} GiB of memory, and {:.1} GiB are available; lower --n-layer, --n-embd or --n-positions, or choose a smaller --preset",
            parameters / 1e6,
            gib(parameters * 16.0),
            gib(free as f64)
        ),
        _ => Ok(()),
    }
}

/// Whether `step` falls on a period of `n` steps; 0 turns the periodic event off (the last step
/// still evaluates and checkpoints).
fn every(step: u64, n: u64) -> bool {
    n != 0 && step.is_multiple_of(n)
}

/// Mean loss over up to [`EVAL_BATCHES`] consecutive batches from the start of `val`.
fn evaluate<B: Backend>(model: &mut Gpt<B>, val: &Tokens, batch: usize, seq: usize) -> Result<f32> {
    let mut loader = Loader::new(val.len(), batch, seq, DataOrder::Sequential, 0)?;
    let batches = EVAL_BATCHES.min((val.len() - 1) / (batch * seq)).max(1);
    let (mut x, mut y) = (vec![0; batch * seq], vec![0; batch * seq]);
    let mut total = 0.0;
    for _ in 0..batches {
        loader.next_batch(val, &mut x, &mut y);
        model.set_batch(&x, &y)?;
        model.forward(None)?;
        total += model.loss(1.0)? as f64;
    }
    Ok((total / batches as f64) as f32)
}

/// The held-out split (when it holds more than one batch) and the losses logged on it.
struct Validation<'a> {
    val: Option<&'a Tokens>,
    batch: (usize, usize),
    /// The first loss logged: a resumed run's is the one it logged before it stopped.
    first: Option<f32>,
    last: Option<f32>,
}

impl Validation<'_> {
    /// Evaluates `model` and logs the loss as `step`'s, everywhere the loss goes.
    fn log<B: Backend>(
        &mut self,
        step: u64,
        model: &mut Gpt<B>,
        metrics: &mut MetricsWriter,
        events: &mut EventWriter,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let Some(val) = self.val else { return Ok(()) };
        let v = evaluate(model, val, self.batch.0, self.batch.1)?;
        self.first.get_or_insert(v);
        self.last = Some(v);
        metrics.write_eval(step, v)?;
        events.add_scalar("val_loss", v, step as i64, wall_time_now())?;
        obs.eval(step, v);
        Ok(())
    }
}

/// Trains from `options` (a new run) or continues `resume` (a run folder) until the last step
/// or until `stop` is set (Ctrl-C), which checkpoints and returns.
pub fn train(
    options: TrainOptions,
    resume: Option<&Path>,
    stop: &AtomicBool,
    obs: &mut dyn Observer,
) -> Result<Finished> {
    let made_out = resume.is_none() && options.out.is_none();
    let cfg = match resume {
        Some(run) => {
            let saved = run.join("config.toml");
            if !saved.is_file() {
                bail!(
                    "{}: cannot read; is {} a flint run folder?",
                    saved.display(),
                    run.display()
                );
            }
            let base = TrainOptions::from_toml_file(&saved)?;
            refuse_changes_on_resume(&options, &saved)?;
            // Flags given with --resume may extend the run or move it to another device or
            // precision (the loop warns that losses then stop being bit-identical).
            TrainOptions {
                out: Some(run.to_path_buf()),
                steps: options.steps.or(base.steps),
                device: options.device.or(base.device),
                precision: options.precision.or(base.precision),
                ..base
            }
            .resolve()?
        }
        None => {
            if options.preset.is_some() && options.init_from.is_some() {
                bail!("--preset and --init-from both name the model; drop one (--init-from takes the model from the folder)");
            }
            options.resolve()?
        }
    };
    let out = cfg.out.clone();
    let result = (|| {
        let selection = device::select(DeviceRequest::parse(&cfg.device)?)?;
        let precision = device::precision(&cfg.precision, &selection.device).map_err(|e| {
            match &selection.fallback_reason {
                Some(why) => anyhow!("{e} (no GPU: {why})"),
                None => e,
            }
        })?;
        let mut described = format!("{}, {}", selection.device.describe(), precision.name());
        if let Some(why) = &selection.fallback_reason {
            described = format!("{described} (no GPU: {why})");
        }
        crate::on_backend!(&selection.device, precision, |backend| train_on(
            backend, &described, cfg, resume, stop, obs
        ))
    })();
    // A refused run leaves no empty `runs/run-N` behind (only an empty folder is removed).
    if result.is_err() && made_out {
        let _ = std::fs::remove_dir(&out);
    }
    result
}

/// [`train`] on one backend.
fn train_on<B: Backend>(
    backend: B,
    device: &str,
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop: &AtomicBool,
    obs: &mut dyn Observer,
) -> Result<Finished> {
    let run = cfg.out.clone();
    let tokenizer = Tokenizer::from_arg(&cfg.tokenizer)?;
    let (model_cfg, init) = match &cfg.init_from {
        Some(dir) => {
            if !dir.join("config.json").is_file() {
                bail!(
                    "--init-from {}: {}; give a transformers GPT-2 folder (config.json + model.safetensors, as save_pretrained writes), e.g. a run's model/",
                    dir.display(),
                    match (dir.is_dir(), dir.exists()) {
                        (true, _) => "no config.json in it",
                        (false, true) => "a file, not a folder",
                        (false, false) => "no such folder",
                    }
                );
            }
            let (mut m, params) = hf::load_gpt2(dir)?;
            if tokenizer.vocab_size() > m.vocab_size {
                bail!(
                    "--tokenizer {} has {} tokens but the model in {} has a vocabulary of {}",
                    tokenizer.spec(),
                    tokenizer.vocab_size(),
                    dir.display(),
                    m.vocab_size
                );
            }
            m.dropout = cfg.dropout as f32;
            let shape = [
                ("--n-layer", cfg.n_layer, m.n_layer),
                ("--n-embd", cfg.n_embd, m.n_embd),
                ("--n-head", cfg.n_head, m.n_head),
                ("--n-positions", cfg.n_positions, m.n_positions),
                ("--n-inner", cfg.n_inner, m.inner()),
            ];
            for (flag, given, loaded) in shape {
                if given.is_some_and(|g| g != loaded) {
                    bail!(
                        "{flag} {} conflicts with --init-from {} ({loaded} there): the model's shape comes from its config.json; drop {flag}",
                        given.expect("some"),
                        dir.display()
                    );
                }
            }
            (m, params)
        }
        None => {
            let m = model_config(&cfg, tokenizer.vocab_size())?;
            let params = gpt::init_params(&m, &gpt::param_layout(&m), cfg.seed);
            (m, params)
        }
    };
    if cfg.seq_len > model_cfg.n_positions {
        bail!(
            "--seq-len {} is above the model's context of {} positions; use --seq-len {1} or less",
            cfg.seq_len,
            model_cfg.n_positions
        );
    }
    let source = match &cfg.data {
        Some(p) => Source::Path(p.clone()),
        None => Source::Embedded {
            name: "tinyshakespeare",
            text: DEFAULT_CORPUS,
        },
    };
    // Beside the run folder (`--out .` included), not in it.
    let cache = std::path::absolute(&run)?
        .parent()
        .unwrap_or(Path::new("/"))
        .join(".flint-data-cache");
    let dataset = data::prepare(source, &tokenizer, &cache, cfg.val_fraction)?;
    for w in &dataset.warnings {
        obs.warn(w);
    }
    let (b, t) = (cfg.batch_size, cfg.seq_len);
    if let Some(val) = dataset.val.as_ref().filter(|v| v.len() <= b * t) {
        obs.warn(&format!(
            "the validation split ({} tokens) is shorter than one batch ({} tokens): no evaluation; raise --val-fraction or lower --batch-size / --seq-len",
            val.len(),
            b * t + 1
        ));
    }
    let mut loader = Loader::new(dataset.train.len(), b, t, cfg.data_order, cfg.seed)?;

    // Resume: parameters, moments, step and data position from the newest good checkpoint.
    let layout = gpt::param_layout(&model_cfg);
    // The folder is locked before any checkpoint is read (another process could be writing
    // or pruning them).
    let _lock = folder::open(&run, resume.is_none(), &mut |w| obs.warn(w))?;
    let resumed = match resume {
        Some(_) => {
            // The tokenizer first: one changed since the checkpoint also changes the model's
            // vocabulary, and the checkpoint would look like another model's.
            if let Some(state) = checkpoint::newest_state(&run) {
                same_tokenizer(&state, &tokenizer, &run)?;
            }
            let ck = checkpoint::latest(&run, &layout, |w| obs.warn(&w))?;
            same_tokenizer(&ck.state, &tokenizer, &run)?;
            same_model(&ck, &model_cfg, &run)?;
            if let Some(changed) = changed_settings(&ck.state, &cfg)? {
                obs.warn(&format!(
                    "{} changed since {} was written ({changed}): the losses will not be bit-identical to an uninterrupted run",
                    run.join("config.toml").display(),
                    ck.dir.display()
                ));
            }
            // Finished: its last step checkpointed and its model written (a kill between the
            // two leaves the model to write).
            let has_model = folder::model_is_current(&run, &ck.dir);
            if cfg.steps == ck.state.step && finished(&ck.state) && has_model {
                bail!(
                    "{}: this run finished at its last step, {}; to train it further give a larger --steps, e.g. {}",
                    run.display(),
                    cfg.steps,
                    train_further(&run, cfg.steps)
                );
            }
            // Equal otherwise: killed before the model was written, or cut short with
            // --steps: what is left is the last evaluation and the model.
            if cfg.steps < ck.state.step {
                bail!(
                    "--steps {} is below the checkpoint's step {}: the run is past it; give a larger --steps",
                    cfg.steps,
                    ck.state.step
                );
            }
            let state: LoaderState = serde_json::from_value(ck.state.loader.clone())?;
            loader.restore(&state)?;
            Some(ck)
        }
        None => None,
    };
    // The run folder and its config, once the settings are known to make a model (and, on a
    // resume, to continue it).
    crate::files::write_atomic(&run.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let params = resumed.as_ref().map_or(&init, |ck| &ck.params);
    let mut model = Gpt::new(backend, model_cfg.clone(), params)?;
    model.plan(BatchShape { batch: b, seq: t })?;
    let adamw = AdamWConfig {
        lr: cfg.lr as f32,
        beta1: cfg.beta1 as f32,
        beta2: cfg.beta2 as f32,
        eps: cfg.eps as f32,
        weight_decay: cfg.weight_decay as f32,
    };
    // fp16 needs dynamic loss scaling; the other precisions have fp32's exponent range.
    let mut scaler = (model.backend().precision() == Precision::Fp16).then(GradScaler::default);
    let mut opt = AdamW::for_gpt(&model, adamw)?;
    let first_step = match &resumed {
        Some(ck) => {
            let (m, v, _) = opt.state();
            model.backend().upload(m, &ck.m)?;
            model.backend().upload(v, &ck.v)?;
            opt.set_updates(ck.state.adam_updates);
            scaler = scaler.map(|fresh| ck.state.grad_scaler.unwrap_or(fresh));
            // Which GPU does not matter, the kind of device and the precision do.
            let kind = |d: &str| d.split(':').next().unwrap_or_default().to_string();
            let now = (
                kind(&model.backend().device()),
                model.backend().precision().name(),
            );
            if let (Some(device), Some(precision)) = (&ck.state.device, &ck.state.precision) {
                if (kind(device), precision.as_str()) != now {
                    obs.warn(&format!(
                        "the checkpoint was trained on {device} in {precision}; continuing on {} in {}: the losses will not be bit-identical to an uninterrupted run",
                        now.0, now.1
                    ));
                }
            }
            if ck
                .state
                .data
                .as_ref()
                .is_some_and(|d| *d != dataset.fingerprint)
            {
                obs.warn(&format!(
                    "the training data changed since {} was written: the losses will not be bit-identical to an uninterrupted run",
                    ck.dir.display()
                ));
            }
            ck.state.step + 1
        }
        None => 1,
    };

    let resume_at = resumed.as_ref().map(|ck| ck.state.step);
    let mut metrics = MetricsWriter::open(&run.join("metrics.jsonl"), resume_at)?;
    let mut events = EventWriter::create(&run)?;
    // Tells TensorBoard to drop the points an interrupted run logged past the checkpoint. A new
    // run marks its start too, as TensorFlow's writers do: TensorBoard's readers then take a
    // later resume's mark as a restart.
    events.mark_resume(first_step as i64 - 1, wall_time_now())?;
    obs.started(&Started {
        run: run.clone(),
        device: device.to_string(),
        parameters: layout.total(),
        model: model_cfg.clone(),
        train_tokens: dataset.train.len(),
        val_tokens: dataset.val.as_ref().map_or(0, |v| v.len()),
        first_step,
        steps: cfg.steps,
        plan: model.describe_plan()?,
    });

    let save = |model: &Gpt<B>,
                opt: &AdamW<B>,
                loader: &Loader,
                scaler: Option<GradScaler>,
                step: u64,
                elapsed_s: f64|
     -> Result<PathBuf> {
        let download = |t: flint_backend::Tensor| -> Result<Vec<f32>> {
            let mut v = vec![0.0; t.len()];
            model.backend().download(t, &mut v)?;
            Ok(v)
        };
        let (m, v, updates) = opt.state();
        let state = checkpoint::State {
            step,
            adam_updates: updates,
            loader: serde_json::to_value(loader.state())?,
            tokenizer: tokenizer.spec(),
            tokenizer_fingerprint: tokenizer.fingerprint(),
            model: serde_json::to_value(&model.config)?,
            grad_scaler: scaler,
            device: Some(model.backend().device()),
            precision: Some(model.backend().precision().name().to_string()),
            data: Some(dataset.fingerprint.clone()),
            elapsed_s: Some(elapsed_s),
            config: Some(cfg.to_toml()?),
            files: Default::default(),
            checksum: String::new(),
        };
        let params = download(model.params())?;
        checkpoint::save(
            &run,
            model.layout(),
            &params,
            &download(m)?,
            &download(v)?,
            state,
            cfg.keep_checkpoints,
        )
    };

    let accum = cfg.grad_accum_steps;
    let (mut x, mut y) = (vec![0i32; b * t], vec![0i32; b * t]);
    // Evaluations log the model after that step's update (the one `checkpoints/step_N` holds),
    // as llm.c does, and a new run first logs its initial model as step 0.
    let mut validation = Validation {
        val: dataset.val.as_ref().filter(|v| v.len() > b * t),
        batch: (b, t),
        first: metrics.first_val_loss(),
        last: None,
    };
    if first_step == 1 {
        validation.log(0, &mut model, &mut metrics, &mut events, obs)?;
    }
    // `elapsed_s` counts training time across resumes, from the checkpoint's.
    let before = resumed
        .as_ref()
        .and_then(|ck| ck.state.elapsed_s)
        .unwrap_or(0.0);
    let started = Instant::now();
    let mut last_step = first_step - 1;
    let mut interrupted = false;
    for step in first_step..=cfg.steps {
        let t0 = Instant::now();
        let lr = lr_at(
            cfg.lr_schedule,
            step,
            cfg.steps,
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_steps,
        );
        opt.config.lr = lr as f32;
        model.zero_grad();
        let loss_scale = scaler.map_or(1.0, |s| s.scale);
        let mut loss = 0.0f32;
        for micro in 0..accum {
            loader.next_batch(&dataset.train, &mut x, &mut y);
            model.set_batch(&x, &y)?;
            // Dropout draws from (seed, micro-batch number): identical after a resume.
            model.forward(Some((
                cfg.seed,
                (step - 1) * accum as u64 + micro as u64 + 1,
            )))?;
            loss += model.loss(loss_scale / accum as f32)? / accum as f32;
            model.backward()?;
        }
        // As GradScaler: unscale, then skip the update when any gradient overflowed.
        let mut update = true;
        if let Some(s) = &mut scaler {
            update = s.unscale_and_update(model.backend(), model.grads())?;
            metrics.loss_scaling = Some(LossScaling {
                loss_scale,
                skipped: !update,
            });
            if !update {
                obs.warn(&format!(
                    "step {step}: fp16 gradients overflowed; update skipped, loss scale {loss_scale} -> {}",
                    s.scale
                ));
            }
        }
        let grad_norm = if !update {
            f32::INFINITY
        } else if cfg.grad_clip > 0.0 {
            clip_grad_norm(model.backend(), model.grads(), cfg.grad_clip as f32)?
        } else {
            model.backend().sum_squares(model.grads())?.sqrt() as f32
        };
        if update {
            opt.step(model.backend(), model.params(), model.grads())?;
        }
        last_step = step;

        let tokens_per_s = (b * t * accum) as f64 / t0.elapsed().as_secs_f64();
        let elapsed_s = before + started.elapsed().as_secs_f64();
        metrics.write_train(step, loss, lr as f32, grad_norm, tokens_per_s, elapsed_s)?;
        let now = wall_time_now();
        events.add_scalar("loss", loss, step as i64, now)?;
        events.add_scalar("lr", lr as f32, step as i64, now)?;
        events.add_scalar("grad_norm", grad_norm, step as i64, now)?;
        obs.step(&StepMetrics {
            step,
            steps: cfg.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            elapsed_s,
        });

        let last = step == cfg.steps;
        if every(step, cfg.eval_every) || last {
            validation.log(step, &mut model, &mut metrics, &mut events, obs)?;
        }
        events.flush()?;
        // A stop during the last step finds the run finished: it ends as one, not as a run to
        // resume (which would then be refused as finished).
        interrupted = stop.load(Ordering::SeqCst) && !last;
        if every(step, cfg.checkpoint_every) || last || interrupted {
            metrics.sync()?;
            events.sync()?;
            let dir = save(&model, &opt, &loader, scaler, step, elapsed_s)?;
            obs.checkpoint(&dir);
        }
        if interrupted {
            break;
        }
    }

    // A resume with no step left still ends with the last step's evaluation.
    if first_step > cfg.steps && !metrics.has_val_loss(cfg.steps) {
        validation.log(cfg.steps, &mut model, &mut metrics, &mut events, obs)?;
    }
    let mut params = vec![0.0; layout.total()];
    model.backend().download(model.params(), &mut params)?;
    hf::save_gpt2(&run.join("model"), &model_cfg, &params, tokenizer.eot())?;
    // Beside the weights, as `save_pretrained` users expect: `flint generate RUN/model` and
    // `AutoTokenizer.from_pretrained` find it there.
    if let Some(file) = tokenizer.file() {
        let bytes =
            std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
        crate::files::write_atomic(&run.join("model/tokenizer.json"), &bytes)?;
    }
    // A short sample to end with. The run itself is done: a sample that fails is a warning.
    let sample = if interrupted {
        None
    } else {
        let mut sample = || -> Result<String> {
            // A newline starts a line of text; a tokenizer that drops whitespace (WordPiece,
            // word-level) starts from its end-of-text token, or id 0.
            let mut prompt = tokenizer.encode("\n")?;
            if prompt.is_empty() {
                prompt.push(tokenizer.eot().unwrap_or(0));
            }
            let s = Sampling {
                max_new_tokens: 200.min(model_cfg.n_positions - prompt.len()),
                temperature: 0.8,
                top_k: 40,
                seed: cfg.seed,
            };
            tokenizer.decode(&generate(&mut model, &prompt, tokenizer.vocab_size(), s)?)
        };
        sample()
            .map_err(|e| obs.warn(&format!("no sample: {e:#}")))
            .ok()
    };
    Ok(Finished {
        run,
        last_step,
        interrupted,
        first_val_loss: validation.first,
        last_val_loss: validation.last,
        sample,
    })
}

#[cfg(test)]
mod tests {
    use super::every;

    #[test]
    fn a_period_of_zero_never_fires() {
        assert!(every(10, 5) && every(5, 5) && every(1, 1));
        assert!(!every(11, 5) && !every(5, 0) && !every(0, 0));
    }
}
