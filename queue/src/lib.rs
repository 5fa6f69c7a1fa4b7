//! tern-queue: the spool. (Temporary stub of the envelope types until the spool branch lands.)

#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub arrival_unix_micros: u64,
    pub size: u64,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub deliver_by: Option<DeliverBy>,
    pub auth: Option<String>,
    pub client_helo: String,
    pub client_addr: String,
}
#[derive(Debug, Clone, PartialEq)]
pub struct Recipient {
    pub addr: String,
    pub notify: u8,
    pub orcpt: Option<String>,
}
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    BinaryMime,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeliverByMode {
    Return,
    Notify,
}
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliverBy {
    pub seconds: i64,
    pub mode: DeliverByMode,
    pub trace: bool,
}

// ---- temporary stub of the spool API (replaced by the spool branch) ----
use std::path::Path;
#[derive(Debug)]
pub enum SpoolError {
    Full,
    Io(std::io::Error),
}
impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
pub struct SpoolOptions {
    pub segment_size: u64,
}
pub struct QueueIdGen(u64, u16);
impl QueueIdGen {
    pub fn next(&mut self) -> String {
        self.0 += 1;
        format!("{:04}{:012}", self.1, self.0)
    }
}
pub struct ShardSpool(QueueIdGen);
pub struct Recovered {
    pub messages: Vec<RecoveredMessage>,
    pub segments: usize,
    pub torn_tails_cut: usize,
    pub corrupt_skipped: usize,
}
pub struct RecoveredMessage {
    pub envelope: Envelope,
    pub segment: u64,
    pub offset: u64,
    pub body_len: u64,
}
pub struct PendingWrite(String);
pub struct Committed {
    pub id: String,
    pub segment: u64,
    pub offset: u64,
}
impl ShardSpool {
    pub fn open(
        _dir: &Path,
        shard: u16,
        _o: SpoolOptions,
    ) -> Result<(ShardSpool, Recovered), SpoolError> {
        Ok((
            ShardSpool(QueueIdGen(0, shard)),
            Recovered {
                messages: vec![],
                segments: 0,
                torn_tails_cut: 0,
                corrupt_skipped: 0,
            },
        ))
    }
    pub fn id_gen(&mut self) -> &mut QueueIdGen {
        &mut self.0
    }
    pub fn prepare(
        &mut self,
        env: &Envelope,
        _body: &[bytes::Bytes],
    ) -> Result<PendingWrite, SpoolError> {
        Ok(PendingWrite(env.id.clone()))
    }
}
pub fn commit_batch(batch: Vec<PendingWrite>) -> Vec<Result<Committed, SpoolError>> {
    batch
        .into_iter()
        .map(|p| {
            Ok(Committed {
                id: p.0,
                segment: 0,
                offset: 0,
            })
        })
        .collect()
}
pub fn scan_spool(_dir: &Path) -> Result<Vec<RecoveredMessage>, SpoolError> {
    Ok(vec![])
}
