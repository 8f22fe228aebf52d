//! The Lua scripts, compiled into the binary and loaded once per Redis.
//!
//! `redis::Script` sends EVALSHA and falls back to sending the source when
//! Redis answers NOSCRIPT, so a restarted Redis needs no special handling.

use redis::Script;
use std::sync::Arc;

/// One field per atomic operation; see the header of each file in `lua/`.
#[derive(Clone)]
pub(crate) struct Scripts {
    pub reserve: Arc<Script>,
    pub load_sale: Arc<Script>,
    pub sale_snapshot: Arc<Script>,
}

impl Default for Scripts {
    fn default() -> Self {
        let s = |src: &str| Arc::new(Script::new(src));
        Self {
            reserve: s(include_str!("../../lua/reserve.lua")),
            load_sale: s(include_str!("../../lua/load_sale.lua")),
            sale_snapshot: s(include_str!("../../lua/sale_snapshot.lua")),
        }
    }
}

impl Scripts {
    /// Every script, for loading them all at start.
    pub fn all(&self) -> [Arc<Script>; 3] {
        [
            self.reserve.clone(),
            self.load_sale.clone(),
            self.sale_snapshot.clone(),
        ]
    }
}
