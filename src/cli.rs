//! The `flashsale` command line: one binary, one subcommand per job.
//!
//! Exit codes: 0 success, 1 a refusal or finding, 2 could not run.

use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, ServeConfig, StoreConfig};
use crate::domain::{SaleId, UserId};
use crate::engine::Engine;
use crate::sales::SaleRequest;

/// A flash-sale engine: Redis on the hot path, MySQL as the record.
#[derive(Parser, Debug)]
#[command(name = "flashsale", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service (HTTP API and background roles).
    Serve(Box<ServeConfig>),
    /// Create the database if missing and run the migrations.
    Migrate {
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Print a buyer token (JWT) for tests and load tests.
    Token {
        /// The buyer's user id.
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Print tokens for this many buyers from --user on, one per line.
        /// The signing secret is read from FLASHSALE_JWT_SECRET.
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Manage sales.
    #[command(subcommand)]
    Sale(SaleCommand),
    /// Check that Redis, the flow backlog and MySQL agree (exit 0 clean,
    /// 1 findings, 2 could not run); `--repair` plans fixes, `--yes` applies them.
    Audit(AuditArgs),
    /// Run the loyalty-points consumer alone: `order.paid` and
    /// `order.refunded` events from the broker into the points ledger in
    /// MySQL, until SIGTERM or Ctrl-C (needs FLASHSALE_AMQP_URL).
    Points(PointsArgs),
    /// Run a whole sale on the local services: a rush of simulated buyers,
    /// payments, cancels, expiries, refunds, settlement and the audit.
    Demo(Box<crate::demo::DemoArgs>),
}

#[derive(clap::Args, Debug)]
struct AuditArgs {
    /// Audit one sale (default: every sale in either store).
    #[arg(long)]
    sale: Option<String>,
    /// Print one JSON document on stdout instead of the human report.
    #[arg(long)]
    json: bool,
    /// Print the repair plan (each finding, its fix, the side taken as the
    /// truth and why); changes nothing without --yes.
    #[arg(long)]
    repair: bool,
    /// With --repair: apply the plan, log each fix in MySQL, audit again.
    #[arg(long, requires = "repair")]
    yes: bool,
    /// Seconds a pending order may be overdue, or a flow record may wait,
    /// before it is a finding.
    #[arg(long, default_value_t = 60)]
    grace_secs: u64,
    #[command(flatten)]
    store: StoreConfig,
    /// The broker and the outbox's retention (the outbox checks).
    #[command(flatten)]
    amqp: crate::config::AmqpConfig,
}

#[derive(clap::Args, Debug)]
struct PointsArgs {
    /// MySQL/MariaDB URL; the database is created if missing and migrated.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/flashsale"
    )]
    database_url: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(
        long,
        env = "FLASHSALE_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    metrics_listen: std::net::SocketAddr,
    #[command(flatten)]
    amqp: AmqpConfig,
}

#[derive(Subcommand, Debug)]
enum SaleCommand {
    /// Put a sale on: persist it in MySQL and load it into Redis.
    Create {
        /// The product's SKU.
        #[arg(long)]
        sku: String,
        /// The product's title.
        #[arg(long)]
        title: String,
        /// Unit price in cents.
        #[arg(long)]
        price_cents: i64,
        /// Units on sale.
        #[arg(long)]
        stock: i64,
        /// Opening time, RFC 3339 (default: now).
        #[arg(long)]
        start_at: Option<DateTime<Utc>>,
        /// Closing time, RFC 3339 (default: one hour after the start).
        #[arg(long)]
        end_at: Option<DateTime<Utc>>,
        /// Most units one buyer may hold.
        #[arg(long, default_value_t = 1)]
        per_user_limit: i64,
        /// Seconds a buyer has to pay.
        #[arg(long, default_value_t = 900)]
        payment_window_secs: i64,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Pause a sale: reservations are refused (409 sale_paused) on every
    /// instance at once; payments, cancels, expiry and refunds go on.
    Pause {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Resume a paused sale.
    Resume {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// End a sale now, for good (409 sale_ended from then on); its pending
    /// orders may still be paid until their deadlines.
    End {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Print a sale as Redis holds it.
    Show {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Rebuild a sale from MySQL now (it must be fenced: Redis lost it or
    /// is behind; a running reconciler does this by itself).
    Rebuild {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Delete keys that another database left under a sale's name (the
    /// sale is fenced `foreign`), so that the sale is rebuilt from this
    /// database's MySQL. Shows what it would delete without `--yes`.
    DiscardForeign {
        /// The sale's id.
        #[arg(long)]
        id: String,
        /// Delete them.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        store: StoreConfig,
    },
}

/// `flashsale sale pause|resume|end`: the admin API's sale controls, run
/// against the stores directly. Prints the sale's state afterwards; exit
/// code 1 when the sale does not exist or has ended (for pause, resume).
async fn control_sale(
    id: &str,
    store: &StoreConfig,
    control: crate::engine::SaleControl,
) -> anyhow::Result<i32> {
    use crate::sales::{ControlError, Controlled};
    let id: SaleId = id.parse().context("--id")?;
    let db = crate::db::connect(&store.database_url).await?;
    let engine = engine(store)?;
    match crate::sales::control(&db, &engine, id, control).await {
        Ok(Controlled::Live(s)) => {
            println!("sale {id}: {}", s.state().label());
            Ok(0)
        }
        Ok(Controlled::Retired) => {
            println!("sale {id}: ended (retired)");
            Ok(0)
        }
        Err(ControlError::NotFound) => {
            eprintln!("no sale {id}");
            Ok(1)
        }
        Err(ControlError::Ended) => {
            eprintln!("sale {id} has ended: it cannot be paused or resumed");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match execute(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

fn engine(store: &StoreConfig) -> anyhow::Result<Engine> {
    Engine::connect(&store.engine_options()?)
}

async fn execute(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Serve(cfg) => {
            let app = crate::startup::App::build(*cfg).await?;
            let token = CancellationToken::new();
            crate::startup::cancel_on_signal(token.clone());
            app.run_until_stopped(token).await?;
            Ok(0)
        }
        Command::Migrate { store } => {
            crate::db::connect(&store.database_url).await?;
            println!("database ready and migrated");
            Ok(0)
        }
        Command::Token { user, ttl, count } => {
            let jwt_secret = crate::config::secret_from_env("FLASHSALE_JWT_SECRET")?;
            let first: UserId = user.parse().context("--user")?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for n in 0..count {
                let user = UserId::new(first.get() + n)?;
                writeln!(
                    out,
                    "{}",
                    crate::http::auth::issue_token(&jwt_secret, user, ttl)?
                )?;
            }
            Ok(0)
        }
        Command::Sale(SaleCommand::Create {
            sku,
            title,
            price_cents,
            stock,
            start_at,
            end_at,
            per_user_limit,
            payment_window_secs,
            store,
        }) => {
            let start_at = start_at.unwrap_or_else(Utc::now);
            let request = SaleRequest {
                sku,
                title,
                price_cents,
                stock,
                start_at,
                end_at: end_at.unwrap_or(start_at + chrono::Duration::hours(1)),
                per_user_limit,
                payment_window_secs,
            };
            let row = match request.validate() {
                Ok(row) => row,
                Err(e) => {
                    eprintln!("refused: {e}");
                    return Ok(1);
                }
            };
            let db = crate::db::connect(&store.database_url).await?;
            let engine = engine(&store)?;
            let sale = crate::sales::create(&db, &engine, &row).await?;
            println!("{}", sale.id);
            Ok(0)
        }
        Command::Audit(args) => audit(args).await,
        Command::Points(args) => points(args).await,
        Command::Demo(args) => crate::demo::run(*args).await,
        Command::Sale(SaleCommand::Pause { id, store }) => {
            control_sale(&id, &store, crate::engine::SaleControl::Pause).await
        }
        Command::Sale(SaleCommand::Resume { id, store }) => {
            control_sale(&id, &store, crate::engine::SaleControl::Resume).await
        }
        Command::Sale(SaleCommand::End { id, store }) => {
            control_sale(&id, &store, crate::engine::SaleControl::End).await
        }
        Command::Sale(SaleCommand::Show { id, store }) => {
            let id: SaleId = id.parse().context("--id")?;
            match engine(&store)?.sale(id).await? {
                Some(s) => {
                    println!(
                        "sale {} {:?}: {} ({}), {} cents, {}/{} available, {} pending, {} paid, state {:?}",
                        s.id, s.sku, s.title, s.id, s.price_cents, s.stock_available,
                        s.stock_total, s.stock_pending, s.stock_paid, s.state()
                    );
                    Ok(0)
                }
                None => {
                    eprintln!("no sale {id} in Redis");
                    Ok(1)
                }
            }
        }
        Command::Sale(SaleCommand::Rebuild { id, store }) => {
            let id: SaleId = id.parse().context("--id")?;
            let db = crate::db::connect(&store.database_url).await?;
            let engine = engine(&store)?;
            engine.load_scripts().await.context("cannot reach Redis")?;
            crate::sales::load_missing(&db, &engine, Some(id)).await?;
            match crate::workers::guard::rebuild_now(&engine, &db, id).await? {
                Some(r) => {
                    println!(
                        "sale {id} rebuilt in {:.3} s: {} orders, {} counted lost, order counter {}",
                        r.took.as_secs_f64(),
                        r.orders,
                        r.lost,
                        r.counter
                    );
                    Ok(0)
                }
                None => {
                    eprintln!(
                        "sale {id} was not rebuilt: it is not fenced for a reason a rebuild cures \
                         (missing, behind), is retired, or another reconciler holds it now"
                    );
                    Ok(1)
                }
            }
        }
        Command::Sale(SaleCommand::DiscardForeign { id, yes, store }) => {
            let id: SaleId = id.parse().context("--id")?;
            let db = crate::db::connect(&store.database_url).await?;
            let engine = engine(&store)?;
            let Some(terms) = crate::db::sale_terms(&db, id).await? else {
                eprintln!("no live sale {id} in MySQL");
                return Ok(1);
            };
            let mut c = engine.connection();
            let held: Option<String> =
                redis::AsyncCommands::hget(&mut c, engine.keys().sale(id).sale, "db").await?;
            if held.as_deref() == Some(terms.token.as_str()) {
                eprintln!(
                    "Redis holds this database's sale {id} (token {}): nothing to discard",
                    terms.token
                );
                return Ok(1);
            }
            let pattern = engine.keys().sale(id).pattern();
            if !yes {
                println!(
                    "would delete every key matching {pattern} (token {:?}, this database's is {}); run again with --yes",
                    held, terms.token
                );
                return Ok(0);
            }
            let n = engine.discard_foreign(id, &terms.token).await?;
            println!("deleted {n} keys of sale {id}; a running reconciler rebuilds it from MySQL");
            Ok(0)
        }
    }
}

/// The points consumer as a process of its own (also role `points` of
/// `serve`).
async fn points(args: PointsArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        args.amqp.url().is_some(),
        "the points consumer needs a broker: set FLASHSALE_AMQP_URL (or --amqp-url), \
         for example amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    let db = crate::db::connect(&args.database_url)
        .await
        .context("cannot prepare the MySQL database (DATABASE_URL)")?;
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
    let token = CancellationToken::new();
    crate::startup::cancel_on_signal(token.clone());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    let ops = tokio::spawn(crate::points::serve_ops(
        listener,
        metrics.clone(),
        token.clone(),
    ));
    tracing::info!(
        queue = %args.amqp.points_queue,
        exchange = %args.amqp.amqp_exchange,
        ops = %args.metrics_listen,
        "points consumer starting"
    );
    crate::points::PointsConsumer::new(db, args.amqp, metrics)
        .run(token.clone())
        .await;
    token.cancel();
    let _ = ops.await;
    tracing::info!("points consumer stopped");
    Ok(0)
}

async fn audit(args: AuditArgs) -> anyhow::Result<i32> {
    use crate::audit::{self, AuditOptions};
    use std::io::IsTerminal;
    let opts = AuditOptions {
        sale: args
            .sale
            .as_deref()
            .map(str::parse)
            .transpose()
            .context("--sale")?,
        grace: std::time::Duration::from_secs(args.grace_secs),
        progress: !args.json && std::io::stderr().is_terminal(),
        events: audit::EventsAudit {
            retention: std::time::Duration::from_secs(args.amqp.outbox_retention_secs),
            broker: args.amqp.amqp_url.is_some(),
        },
    };
    let db = crate::db::connect(&args.store.database_url).await?;
    let engine = engine(&args.store)?;
    engine.load_scripts().await.context("cannot reach Redis")?;
    let report = audit::run(&engine, &db, &opts).await?;
    let mut out = std::io::stdout().lock();
    if !args.repair || report.is_clean() {
        if args.json {
            serde_json::to_writer_pretty(&mut out, &audit::to_json(&report))?;
            writeln!(out)?;
        } else {
            audit::print_human(&report, args.repair, &mut out)?;
        }
        return Ok(if report.is_clean() { 0 } else { 1 });
    }
    if !args.yes {
        if args.json {
            serde_json::to_writer_pretty(&mut out, &audit::to_json(&report))?;
            writeln!(out)?;
        } else {
            audit::print_human(&report, true, &mut out)?;
            writeln!(
                out,
                "repair: nothing changed; run again with --yes to apply this plan"
            )?;
        }
        return Ok(1);
    }
    let applied = audit::apply(&engine, &db, &report).await?;
    let after = audit::run(&engine, &db, &opts).await?;
    if args.json {
        let doc = serde_json::json!({
            "before": audit::to_json(&report),
            "applied": applied,
            "after": audit::to_json(&after),
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        audit::print_human(&report, true, &mut out)?;
        for a in &applied {
            let done = if a.applied {
                "applied"
            } else {
                "skipped (state moved on)"
            };
            writeln!(
                out,
                "repair: sale {} [{}] {}: {done}",
                a.sale_id,
                a.finding,
                a.fix.describe()
            )?;
        }
        writeln!(out, "audit after repair:")?;
        audit::print_human(&after, false, &mut out)?;
    }
    Ok(if after.is_clean() { 0 } else { 1 })
}
