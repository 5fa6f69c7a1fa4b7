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
