//! The generator's engine: one glommio executor per core, workers on each, and the
//! schedule they follow.
//!
//! Owns: starting the executors (pinned to the CPUs this process may run on), starting
//! them all at one instant, the closed and open loops, the run's bounds (warm-up,
//! duration, count, per-op timeout, SIGINT/SIGTERM) and the live progress line.
//!
//! Closed loop: `--concurrency` workers (spread over the cores), each running one op after
//! another; latency is measured from the op's actual start.
//!
//! Open loop (`--rate R`): the intended start times form one global schedule,
//! t0 + i/R. Core k owns every `cores`-th slot (offset k/R), and its workers (its share of
//! `--concurrency`, the most ops it keeps in flight) claim the core's slots in order. A
//! worker sleeps until its slot's time; when all workers are busy past a slot's time, the
//! slot starts late and its latency still counts from the intended time: the coordinated
//! omission correction of wrk2, so a stalled server shows up as latency instead of
//! silently lowering the offered rate. The service time from the actual start is
//! recorded alongside (`*_service`).
//!
//! Every run stops by itself: no op starts after warm-up + duration, or once `--count`
//! measured ops have been started; each op is bounded by `--timeout`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::conn::OpError;
use crate::scenario::{self, Core, Kind, ScenarioCfg, Worker};
use crate::stats::{Progress, Stats};

pub struct Plan {
    pub cfg: Arc<ScenarioCfg>,
    /// Number of executors.
    pub cores: usize,
    /// Pin executor i to this CPU (None: unpinned).
    pub cpus: Option<Vec<usize>>,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub count: Option<u64>,
    pub timeout: Duration,
    pub progress: bool,
}

pub struct Outcome {
    pub stats: Stats,
    /// From the end of warm-up to the last measured op's completion.
    pub elapsed: Duration,
    pub interrupted: bool,
}

/// State shared by all cores: stop flag, count tickets, progress counters, start gate.
struct Shared {
    stop: AtomicBool,
    /// Measured ops still allowed to start (u64::MAX without `--count`).
    tickets: AtomicU64,
    progress: Arc<Progress>,
    /// The common start instant; `Some(None)` aborts (another executor failed).
    gate: (Mutex<Option<Option<Instant>>>, Condvar),
    done: AtomicUsize,
}

impl Shared {
    fn take_ticket(&self) -> bool {
        self.tickets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
            .is_ok()
    }
}

/// Per-core schedule for the open loop.
struct Sched {
    t0: Instant,
    deadline: Instant,
    /// (offset of this core's first slot, spacing between its slots) in open loop.
    open: Option<(f64, f64)>,
    next: Cell<u64>,
    /// Slots whose op was started.
    started: Cell<u64>,
    timeout: Duration,
}

impl Sched {
    fn next_slot(&self) -> Option<Instant> {
        let (offset, spacing) = self.open?;
        let i = self.next.get();
        self.next.set(i + 1);
        Some(self.t0 + Duration::from_secs_f64(offset + spacing * i as f64))
    }
}

fn split(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

pub fn run(plan: Plan, stop_signal: Arc<AtomicBool>) -> Result<Outcome, String> {
    let cores = plan.cores.max(1).min(plan.concurrency.max(1));
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        tickets: AtomicU64::new(plan.count.unwrap_or(u64::MAX)),
        progress: Arc::new(Progress::default()),
        gate: (Mutex::new(None), Condvar::new()),
        done: AtomicUsize::new(0),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<usize>();
    let mut handles = Vec::new();
    for i in 0..cores {
        let placement = match &plan.cpus {
            Some(cpus) => Placement::Fixed(cpus[i % cpus.len()]),
            None => Placement::Unbound,
        };
        let shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let cfg = plan.cfg.clone();
        let workers = split(plan.concurrency, cores, i);
        let rate = plan.rate;
        let (warmup, duration, timeout) = (plan.warmup, plan.duration, plan.timeout);
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("loadgen-{i}"))
            // Small rings: see the stack notes on RLIMIT_MEMLOCK.
            .io_memory(512 * 1024)
            .ring_depth(256)
            .spawn(move || async move {
                let _ = ready_tx.send(i);
                drop(ready_tx);
                let t0 = {
                    let (m, cv) = &shared.gate;
                    let mut g = m.lock().unwrap();
                    while g.is_none() {
                        g = cv.wait(g).unwrap();
                    }
                    g.unwrap()
                };
                let stats = match t0 {
                    Some(t0) => {
                        let sched = Rc::new(Sched {
                            t0,
                            deadline: t0 + warmup + duration,
                            open: rate.map(|r| {
                                let r = r.max(1e-6);
                                (i as f64 / r, cores as f64 / r)
                            }),
                            next: Cell::new(0),
                            started: Cell::new(0),
                            timeout,
                        });
                        run_core(cfg, i, workers, t0 + warmup, sched, shared.clone()).await
                    }
                    None => (Stats::default(), None),
                };
                shared.done.fetch_add(1, Ordering::Relaxed);
                stats
            })
            .map_err(|e| format!("cannot start executor {i}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);

    // Executor construction errors only surface at join: wait for every executor to say it
    // is running, else abort the others and report the failure.
    let mut ready = 0;
    while ready < cores {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(_) => ready += 1,
            Err(_) => break,
        }
    }
    let open_gate = |v: Option<Instant>| {
        let (m, cv) = &shared.gate;
        *m.lock().unwrap() = Some(v);
        cv.notify_all();
    };
    if ready < cores {
        open_gate(None);
        let mut why = String::from("an executor did not start");
        for h in handles {
            if let Err(e) = h.join() {
                why = format!("executor failed: {e}");
            }
        }
        return Err(why);
    }
    // A short lead time so that every executor is waiting when t0 comes.
    let t0 = Instant::now() + Duration::from_millis(20);
    let measure_from = t0 + plan.warmup;
    let deadline = measure_from + plan.duration;
    open_gate(Some(t0));

    // Live progress once per second, SIGINT/SIGTERM, and a hard stop well past the deadline.
    let mut interrupted = false;
    let mut last = (0u64, 0u64);
    let mut next_tick = t0 + Duration::from_secs(1);
    let hard_stop = deadline + plan.timeout + Duration::from_secs(2);
    while shared.done.load(Ordering::Relaxed) < cores {
        std::thread::sleep(Duration::from_millis(20));
        if stop_signal.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
            interrupted = true;
            shared.stop.store(true, Ordering::Relaxed);
        }
        let now = Instant::now();
        if now >= hard_stop {
            shared.stop.store(true, Ordering::Relaxed);
        }
        if now >= next_tick {
            let (ok, err) = (shared.progress.ok(), shared.progress.err());
            if plan.progress {
                let secs = now.saturating_duration_since(t0).as_secs();
                let phase = if now < measure_from { " (warm-up)" } else { "" };
                eprintln!(
                    "[{secs:>4}s] {:>9} ok/s {:>7} err/s   total {ok} ok, {err} errors{phase}",
                    ok - last.0,
                    err - last.1
                );
            }
            last = (ok, err);
            next_tick += Duration::from_secs(1);
        }
    }

    let mut stats = Stats::default();
    let mut last_done: Option<Instant> = None;
    for h in handles {
        let (s, done) = h.join().map_err(|e| format!("executor failed: {e}"))?;
        stats.merge(s);
        last_done = last_done.max(done);
    }
    let elapsed = last_done
        .map(|t| t.saturating_duration_since(measure_from))
        .unwrap_or_default();
    Ok(Outcome {
        stats,
        elapsed,
        interrupted,
    })
}

/// One core: its workers, until the schedule or the count runs out.
async fn run_core(
    cfg: Arc<ScenarioCfg>,
    index: usize,
    workers: usize,
    measure_from: Instant,
    sched: Rc<Sched>,
    shared: Arc<Shared>,
) -> (Stats, Option<Instant>) {
    let tls = match cfg.tls {
        scenario::TlsMode::None => None,
        _ => Some(
            crate::tls::client_config(&cfg.trust, cfg.resume)
                .expect("TLS configuration was validated before start"),
        ),
    };
    let server_name = crate::tls::server_name(&cfg.sni).expect("validated before start");
    let body = if cfg.kind == Kind::Relay {
        scenario::relay::filler(cfg.relay.size)
    } else {
        Vec::new()
    };
    let core = Rc::new(Core {
        cfg,
        index,
        tls,
        server_name,
        sasl: Default::default(),
        stats: RefCell::new(Stats::default()),
        progress: shared.progress.clone(),
        measure_from,
        body,
        seq: Cell::new(0),
    });
    let last_done = Rc::new(Cell::new(None::<Instant>));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            glommio::spawn_local(worker(
                core.clone(),
                sched.clone(),
                shared.clone(),
                last_done.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let mut stats = core.stats.take();
    if let Some((offset, spacing)) = sched.open {
        // Slots due before the deadline that never started: the target fell behind.
        // Not meaningful when the count or a signal ended the run.
        let window = (sched.deadline - sched.t0).as_secs_f64() - offset;
        let due = if window > 0.0 {
            (window / spacing).ceil() as u64
        } else {
            0
        };
        let ended_early =
            shared.stop.load(Ordering::Relaxed) || shared.tickets.load(Ordering::Relaxed) == 0;
        if !ended_early {
            stats.unstarted = due.saturating_sub(sched.started.get());
        }
    }
    (stats, last_done.get())
}

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(d).await;
        Err(OpError::Timeout)
    })
    .await
}

async fn worker(
    core: Rc<Core>,
    sched: Rc<Sched>,
    shared: Arc<Shared>,
    last_done: Rc<Cell<Option<Instant>>>,
) {
    let mut w = Worker::new(&core);
    let now = Instant::now();
    if sched.t0 > now {
        glommio::timer::sleep(sched.t0 - now).await;
    }
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let origin = match sched.next_slot() {
            Some(t) => {
                if t >= sched.deadline {
                    break;
                }
                let now = Instant::now();
                if t > now {
                    glommio::timer::sleep(t - now).await;
                }
                t
            }
            None => Instant::now(),
        };
        // Bounded in time even in open loop: slots still waiting when the deadline passes
        // are not started (they are reported as `unstarted`).
        if Instant::now() >= sched.deadline || shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let measured = origin >= core.measure_from;
        if measured && !shared.take_ticket() {
            break;
        }
        sched.started.set(sched.started.get() + 1);
        let c = &*core;
        let res = with_timeout(sched.timeout, async {
            match c.cfg.kind {
                Kind::Connect => scenario::connect::op(c, &w, origin, measured).await,
                Kind::Auth => scenario::auth::op(c, &w, origin, measured).await,
                Kind::Relay => scenario::relay::op(c, &mut w, origin, measured).await,
            }
        })
        .await;
        {
            let mut s = core.stats.borrow_mut();
            match &res {
                Ok(()) if measured => s.ok += 1,
                Ok(()) => s.warmup_ok += 1,
                Err(e) if measured => s.error(e),
                Err(_) => s.warmup_failed += 1,
            }
            if measured {
                s.attempted += 1;
                last_done.set(Some(Instant::now()));
            }
        }
        match res {
            Ok(()) => core.progress.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                if matches!(e, OpError::Connect(_)) {
                    // Do not spin on a refused port; the errors are still counted.
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                core.progress.err.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    if let Some(s) = w.session.take() {
        let _ = with_timeout(sched.timeout, async {
            scenario::quit(s).await;
            Ok(())
        })
        .await;
    }
}
