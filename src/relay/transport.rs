//! What a local session or the spool asks of an upstream: open a transaction for an account,
//! a sender and the recipients known so far (each with its own verdict; SMTP sends them in
//! one flight where the upstream pipelines), add later recipients one by one, send the content
//! (whole, or streamed piece by piece as it arrives), and finish or abort (or abandon it
//! mid-content: the upstream never sees the final dot). The session and the spool
//! deliverer speak only this interface; how a transport reaches Microsoft 365 is its own
//! business (`relay::smtp::transaction`: SMTP sessions from the pool; `relay::graph`:
//! Microsoft Graph), so another transport is a new variant here, not an edit of the session.
//! Which one an account uses is its `transport` (SPEC "Microsoft Graph transport").

use crate::config::Config;
use crate::relay::envelope::{Address, MailParams, ReversePath};
use crate::relay::graph::{GraphTransaction, GraphTransport};
use crate::relay::pool::{BeginError, Pool};
use crate::relay::smtp::transaction::{RcptVerdicts, SmtpTransaction};
use crate::relay::upstream::{UpReply, UpstreamError};

/// The upstream transport of all accounts.
#[derive(Debug, Clone)]
pub struct Transport {
    pool: Pool,
    /// The accounts with `transport = "graph"`.
    graph: Option<GraphTransport>,
}

impl Transport {
    pub(crate) fn smtp(pool: Pool) -> Transport {
        Transport { pool, graph: None }
    }

    /// The same, with Graph for the accounts configured for it.
    pub(crate) fn with_graph(self, graph: GraphTransport) -> Transport {
        Transport {
            graph: Some(graph),
            ..self
        }
    }

    /// Follows a reloaded configuration (which accounts use Graph); the pool has its own.
    pub(crate) fn reconfigure(&self, config: &Config) {
        if let Some(g) = &self.graph {
            g.reconfigure(config);
        }
    }

    /// Opens a transaction for `account` with this sender and the recipients `rcpts` (SMTP:
    /// a pooled session, MAIL and a RCPT each). `size` is the real message size when known
    /// (spool), else the client's SIZE=. The sender's reply and each recipient's verdict, in
    /// order; a refused sender is an error.
    pub(crate) async fn begin(
        &self,
        account: &str,
        from: &ReversePath,
        params: &MailParams,
        size: Option<usize>,
        rcpts: &[Address],
    ) -> Result<(Transaction, UpReply, RcptVerdicts), BeginError> {
        if let Some(g) = self.graph.as_ref().filter(|g| g.serves(account)) {
            let (mut t, reply) = g.begin(account, from, params, size).await?;
            let mut verdicts = Vec::with_capacity(rcpts.len());
            for to in rcpts {
                verdicts.push(t.rcpt(to).await);
            }
            return Ok((Transaction::Graph(t), reply, verdicts));
        }
        let (t, reply, verdicts) =
            SmtpTransaction::begin(&self.pool, account, (from, params, size), rcpts).await?;
        Ok((Transaction::Smtp(t), reply, verdicts))
    }
}

/// One open upstream transaction (the sender accepted).
#[derive(Debug)]
pub(crate) enum Transaction {
    Smtp(SmtpTransaction),
    Graph(GraphTransaction),
}

impl Transaction {
    /// Adds a recipient; the upstream's verdict on it.
    pub(crate) async fn rcpt(&mut self, to: &Address) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.rcpt(to).await,
            Transaction::Graph(t) => t.rcpt(to).await,
        }
    }

    /// The upstream can no longer carry this transaction (the connection broke).
    pub(crate) fn is_broken(&mut self) -> bool {
        match self {
            Transaction::Smtp(t) => t.is_broken(),
            Transaction::Graph(t) => t.is_broken(),
        }
    }

    /// Announces the content (SMTP: `DATA`, answered 354, or nothing where the content goes
    /// as BDAT); any other positive reply is a protocol error and nothing is sent.
    pub(crate) async fn start_data(&mut self) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.start_data().await,
            Transaction::Graph(t) => t.start_data().await,
        }
    }

    /// Streams one piece of the content (unstuffed, CRLF line endings, split anywhere)
    /// after [`Transaction::start_data`]. On an error the transaction is lost (4xx to the
    /// client); nothing more may be sent.
    pub(crate) async fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.send_chunk(chunk).await,
            Transaction::Graph(t) => t.send_chunk(chunk).await,
        }
    }

    /// Ends the content; the final verdict (2xx taken, 4xx/5xx refused).
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.finish_content().await,
            Transaction::Graph(t) => t.finish_content().await,
        }
    }

    /// Gives up mid-content: nothing of it is ever delivered.
    pub(crate) fn break_off(&mut self) {
        match self {
            Transaction::Smtp(t) => t.break_off(),
            Transaction::Graph(t) => t.break_off(),
        }
    }

    /// Drops the transaction mid-content: the upstream never takes the message.
    pub(crate) fn abandon(self) {
        match self {
            Transaction::Smtp(t) => t.abandon(),
            Transaction::Graph(t) => t.abandon(),
        }
    }

    /// Done with the transaction after a final verdict (or a refused DATA).
    pub(crate) async fn finish(self) {
        match self {
            Transaction::Smtp(t) => t.finish().await,
            Transaction::Graph(t) => t.finish().await,
        }
    }

    /// How long the upstream asked to wait before trying again (Graph's Retry-After).
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Transaction::Smtp(_) => None,
            Transaction::Graph(t) => t.retry_after(),
        }
    }

    /// The upstream's HTTP status for the outcome (the relay log's `upstream_code` on Graph:
    /// 202, 429, 403...); `None` for SMTP (its reply code is the code) and when there was no
    /// HTTP answer.
    pub(crate) fn upstream_status(&self) -> Option<u16> {
        match self {
            Transaction::Smtp(_) => None,
            Transaction::Graph(t) => t.http_status(),
        }
    }

    /// Abandons the transaction before its content.
    pub(crate) async fn abort(self) {
        match self {
            Transaction::Smtp(t) => t.abort().await,
            Transaction::Graph(t) => t.abort().await,
        }
    }
}
