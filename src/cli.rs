//! The `flashsale` command line: one binary, one subcommand per job.
//!
//! Exit codes: 0 success, 1 a refusal or finding, 2 could not run.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{JwtConfig, ServeConfig, StoreConfig};
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
        #[command(flatten)]
        jwt: JwtConfig,
    },
    /// Manage sales.
    #[command(subcommand)]
    Sale(SaleCommand),
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
    /// Print a sale as Redis holds it.
    Show {
        /// The sale's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreConfig,
    },
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
    Engine::connect(&store.engine_options())
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
        Command::Token { user, ttl, jwt } => {
            let user: UserId = user.parse().context("--user")?;
            println!(
                "{}",
                crate::http::auth::issue_token(&jwt.jwt_secret, user, ttl)?
            );
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
    }
}
