//! The Lua scripts, compiled into the binary and loaded once per Redis.
//!
//! `redis::Script` sends EVALSHA and falls back to sending the source when
//! Redis answers NOSCRIPT, so a restarted Redis needs no special handling.
//! Scripts that share helpers get `lua/prelude.lua` prepended.

use redis::Script;
use std::sync::Arc;

// One module per script whose reply has a shape of its own: its reply
// type decodes itself and refuses anything outside the script's contract.
pub(crate) mod cancel;
pub(crate) mod control;
pub(crate) mod expire;
pub(crate) mod guard;
pub(crate) mod pay;
pub(crate) mod rebuild;
pub(crate) mod refund;
mod reply;
pub(crate) mod reserve;
pub(crate) mod retire;

const PRELUDE: &str = include_str!("../../lua/prelude.lua");

/// One field per atomic operation; see the header of each file in `lua/`.
#[derive(Clone)]
pub(crate) struct Scripts {
    pub reserve: Arc<Script>,
    pub pay: Arc<Script>,
    pub cancel: Arc<Script>,
    pub expire: Arc<Script>,
    pub refund: Arc<Script>,
    pub settle: Arc<Script>,
    pub audit_snapshot: Arc<Script>,
    pub audit_fix: Arc<Script>,
    pub load_sale: Arc<Script>,
    pub sale_snapshot: Arc<Script>,
    pub read_orders: Arc<Script>,
    pub retire: Arc<Script>,
    pub guard: Arc<Script>,
    pub rebuild_begin: Arc<Script>,
    pub rebuild_read: Arc<Script>,
    pub rebuild_write: Arc<Script>,
    pub rebuilt: Arc<Script>,
    pub fence: Arc<Script>,
    pub rebuild_clear: Arc<Script>,
    pub rebuild_put: Arc<Script>,
    pub control: Arc<Script>,
}

fn plain(src: &str) -> Arc<Script> {
    Arc::new(Script::new(src))
}

fn order_script(src: &str) -> Arc<Script> {
    Arc::new(Script::new(&format!("{PRELUDE}\n{src}")))
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            reserve: order_script(include_str!("../../lua/reserve.lua")),
            pay: order_script(include_str!("../../lua/pay.lua")),
            cancel: order_script(include_str!("../../lua/cancel.lua")),
            expire: order_script(include_str!("../../lua/expire.lua")),
            refund: order_script(include_str!("../../lua/refund.lua")),
            settle: plain(include_str!("../../lua/settle.lua")),
            audit_snapshot: order_script(include_str!("../../lua/audit_snapshot.lua")),
            audit_fix: order_script(include_str!("../../lua/audit_fix.lua")),
            load_sale: plain(include_str!("../../lua/load_sale.lua")),
            sale_snapshot: plain(include_str!("../../lua/sale_snapshot.lua")),
            read_orders: order_script(include_str!("../../lua/read_orders.lua")),
            retire: order_script(include_str!("../../lua/retire.lua")),
            guard: order_script(include_str!("../../lua/guard.lua")),
            rebuild_begin: order_script(include_str!("../../lua/rebuild_begin.lua")),
            rebuild_read: order_script(include_str!("../../lua/rebuild_read.lua")),
            rebuild_write: order_script(include_str!("../../lua/rebuild_write.lua")),
            rebuilt: order_script(include_str!("../../lua/rebuilt.lua")),
            fence: order_script(include_str!("../../lua/fence.lua")),
            rebuild_clear: plain(include_str!("../../lua/rebuild_clear.lua")),
            rebuild_put: plain(include_str!("../../lua/rebuild_put.lua")),
            control: order_script(include_str!("../../lua/control.lua")),
        }
    }
}

impl Scripts {
    /// Every script, for loading them all at start.
    pub fn all(&self) -> [Arc<Script>; 20] {
        [
            self.reserve.clone(),
            self.pay.clone(),
            self.cancel.clone(),
            self.expire.clone(),
            self.refund.clone(),
            self.settle.clone(),
            self.audit_snapshot.clone(),
            self.audit_fix.clone(),
            self.load_sale.clone(),
            self.sale_snapshot.clone(),
            self.read_orders.clone(),
            self.retire.clone(),
            self.guard.clone(),
            self.rebuild_begin.clone(),
            self.rebuild_read.clone(),
            self.rebuild_write.clone(),
            self.rebuilt.clone(),
            self.fence.clone(),
            self.rebuild_clear.clone(),
            self.rebuild_put.clone(),
        ]
    }
}
