//! A thin, safe layer over libnftnl (nftnl-sys): dumps one nf_tables table's rules, sets and
//! set elements over netlink and decodes them into plain Rust values. It interprets nothing;
//! the nftables reader decides what the values mean.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::c_char;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use nftnl_sys as sys;

use crate::netns::NetNs;

pub const NFPROTO_IPV4: u16 = 2;
pub const NFPROTO_IPV6: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// The data type of a verdict map's values.
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
pub const NFT_SET_ANONYMOUS: u32 = 0x1;
pub const NFT_SET_MAP: u32 = 0x8;
pub const NFT_GOTO: i32 = -4;
pub const NFT_JUMP: i32 = -3;
pub const NFT_NAT_DNAT: u32 = 1;

/// One decoded expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// `immediate` loading data into a register.
    Immediate { dreg: u32, data: Vec<u8> },
    /// `immediate` setting the verdict (`goto`/`jump` carry a chain).
    Verdict { code: i32, chain: Option<String> },
    /// `lookup` of register `sreg` in a set; `dreg == Some(0)` makes it a verdict map.
    Lookup { set: String, sreg: u32, dreg: Option<u32> },
    /// `numgen` (random or incremental) loading a number in `offset .. offset + modulus` into
    /// `dreg`: kube-proxy's `numgen random mod N vmap { 0 : goto …, … }`.
    Numgen { dreg: u32, modulus: u32, offset: u32 },
    /// `nat`: DNAT/SNAT from registers.
    Nat {
        kind: u32,
        addr_reg: Option<u32>,
        /// The range's upper end (the kernel reports it equal to `addr_reg` for one address).
        addr_max_reg: Option<u32>,
        proto_reg: Option<u32>,
        proto_max_reg: Option<u32>,
    },
    /// `payload load` of `len` bytes at `offset` of header `base` into `dreg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `meta load` of `key` into `dreg` (a `meta set` has no dreg: `None`).
    Meta { key: u32, dreg: Option<u32> },
    /// `cmp` of register `sreg` against `data` with operator `op`.
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `bitwise` on a register (a mask: the loaded value is no longer whole).
    Bitwise { sreg: u32, dreg: u32 },
    /// An xtables match run through nft_compat (iptables-nft), with its binary info.
    Match { name: String, rev: u32, info: Vec<u8> },
    /// An xtables target run through nft_compat (iptables-nft), with its binary info.
    Target { name: String, rev: u32, info: Vec<u8> },
    /// Any other expression, by name.
    Other(String),
}

pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_CMP_EQ: u32 = 0;

#[derive(Clone, Debug, PartialEq)]
pub struct NftRule {
    pub chain: String,
    pub exprs: Vec<Expr>,
    /// The rule's user data (TLVs; iptables-nft may keep a rule's comment there).
    pub userdata: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NftElem {
    pub key: Vec<u8>,
    pub verdict: Option<(i32, Option<String>)>,
    /// A data map's value (kube-proxy ≥ 1.35's `dnat … to numgen … map { 0 : addr . port }`).
    pub data: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NftSet {
    pub name: String,
    pub flags: u32,
    pub data_type: Option<u32>,
    pub elems: Vec<NftElem>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NftTable {
    pub rules: Vec<NftRule>,
    pub sets: Vec<NftSet>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftnlError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("the ruleset changed during the dump")]
    Interrupted,
    #[error("libnftnl could not allocate or parse a message")]
    Parse,
}

fn cstr(p: *const c_char) -> Option<String> {
    // SAFETY: libnftnl returns NUL-terminated strings it owns, valid while the object lives.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies `len` bytes libnftnl owns (empty for NULL).
fn bytes(p: *const std::ffi::c_void, len: u32) -> Vec<u8> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: libnftnl guarantees `len` readable bytes at `p` while the object lives.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec()
}

/// A netlink socket speaking nf_tables, opened in a given network namespace.
pub struct NftConn {
    sock: Socket,
    seq: u32,
    buf: Vec<u64>,
}

impl NftConn {
    pub fn open(netns: &NetNs) -> io::Result<Self> {
        let sock = netns
            .run(|| -> io::Result<Socket> {
                let mut s = Socket::new(NETLINK_NETFILTER)?;
                s.bind_auto()?;
                Ok(s)
            })
            .map_err(io::Error::other)??;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        let _ = sock.set_rx_buf_sz(8 * 1024 * 1024);
        super::set_recv_deadline(&sock, super::KERNEL_REPLY_DEADLINE)?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0u64; 64 * 1024],
        })
    }

    /// The receive deadline of this connection's socket.
    pub fn recv_deadline(&self) -> io::Result<Option<std::time::Duration>> {
        super::recv_deadline(&self.sock)
    }

    /// Sends one dump request built by `build` and hands every reply message to `each`.
    /// Returns Ok(false) when the kernel answered ENOENT (no such table or set).
    fn dump(
        &mut self,
        cmd: u16,
        family: u16,
        flags: u16,
        build: impl FnOnce(*mut libc::nlmsghdr),
        mut each: impl FnMut(*const libc::nlmsghdr) -> Result<(), NftnlError>,
    ) -> Result<bool, NftnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = vec![0u64; 1024];
        // SAFETY: `req` is 8 KiB, aligned, and outlives the header libnftnl writes into it.
        let nlh = unsafe { sys::nftnl_nlmsg_build_hdr(req.as_mut_ptr().cast(), cmd, family, flags, self.seq) };
        build(nlh);
        // SAFETY: nlh points into `req`; nlmsg_len was set by the builders.
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        // SAFETY: `req` holds at least `len` initialised bytes written by libnftnl.
        let bytes = unsafe { std::slice::from_raw_parts(req.as_ptr().cast::<u8>(), len) };
        self.sock.send(bytes, 0)?;
        let mut interrupted = false;
        loop {
            let cap = self.buf.len() * 8;
            // SAFETY: the u64 buffer viewed as bytes, for recv to fill.
            let raw = unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), cap) };
            let n = self.sock.recv(&mut &mut raw[..], 0)?;
            let mut off = 0;
            while off + 16 <= n {
                let hdr = self
                    .buf
                    .as_ptr()
                    .cast::<u8>()
                    .wrapping_add(off)
                    .cast::<libc::nlmsghdr>();
                // SAFETY: off is 4-byte aligned within a u64 buffer and at least 16 bytes remain.
                let (len, kind, flags, seq) = unsafe {
                    (
                        (*hdr).nlmsg_len as usize,
                        (*hdr).nlmsg_type,
                        (*hdr).nlmsg_flags,
                        (*hdr).nlmsg_seq,
                    )
                };
                if len < 16 || off + len > n {
                    return Err(NftnlError::Parse);
                }
                if seq == self.seq {
                    interrupted |= flags & NLM_F_DUMP_INTR != 0;
                    match kind {
                        NLMSG_DONE => {
                            return if interrupted {
                                Err(NftnlError::Interrupted)
                            } else {
                                Ok(true)
                            };
                        }
                        NLMSG_ERROR => {
                            // An error message carries an i32 errno right after the header: all
                            // four bytes must be inside the message and the datagram.
                            if len < 20 || off + 20 > n {
                                return Err(NftnlError::Io(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "truncated netlink error message",
                                )));
                            }
                            let at = off + 16;
                            // SAFETY: the u64 buffer viewed as bytes; `at + 4 <= n <= its size`.
                            let bytes =
                                unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>().add(at), 4) };
                            let errno = i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                            return match super::netlink_error(errno) {
                                None => Ok(true),
                                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                                Some(e) => Err(NftnlError::Io(e)),
                            };
                        }
                        _ => each(hdr)?,
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Whether table `name` exists in `family`.
    pub fn table_exists(&mut self, family: u16, name: &str) -> Result<bool, NftnlError> {
        let cname = CString::new(name).map_err(|_| NftnlError::Parse)?;
        self.dump(
            NFT_MSG_GETTABLE,
            family,
            NLM_F_ACK,
            |nlh| with_table(nlh, &cname),
            |_| Ok(()),
        )
    }

    /// Whether chain `chain` exists in table `table` of `family` (one small request).
    pub fn chain_exists(&mut self, family: u16, table: &str, chain: &str) -> Result<bool, NftnlError> {
        let ct = CString::new(table).map_err(|_| NftnlError::Parse)?;
        let cc = CString::new(chain).map_err(|_| NftnlError::Parse)?;
        self.dump(
            NFT_MSG_GETCHAIN,
            family,
            NLM_F_ACK,
            // SAFETY: the chain object is freed right after it is serialised into nlh.
            |nlh| unsafe {
                let c = sys::nftnl_chain_alloc();
                if c.is_null() {
                    return;
                }
                sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, ct.as_ptr());
                sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, cc.as_ptr());
                sys::nftnl_chain_nlmsg_build_payload(nlh, c);
                sys::nftnl_chain_free(c);
            },
            |_| Ok(()),
        )
    }

    /// The rules of one chain; empty when the chain does not exist.
    pub fn chain_rules(&mut self, family: u16, table: &str, chain: &str) -> Result<Vec<NftRule>, NftnlError> {
        let ct = CString::new(table).map_err(|_| NftnlError::Parse)?;
        let cc = CString::new(chain).map_err(|_| NftnlError::Parse)?;
        let mut rules = Vec::new();
        self.dump(
            NFT_MSG_GETRULE,
            family,
            NLM_F_DUMP,
            |nlh| with_rule_filter_chain(nlh, &ct, Some(&cc)),
            |nlh| {
                rules.push(decode_rule(nlh)?);
                Ok(())
            },
        )?;
        // The kernel filters dumps by table; keep only the chain asked for.
        rules.retain(|r| r.chain == chain);
        Ok(rules)
    }

    /// The elements of one set; `None` when the set does not exist.
    fn elems(&mut self, family: u16, table: &CStr, set: &CStr) -> Result<Option<Vec<NftElem>>, NftnlError> {
        let mut elems = Vec::new();
        let found = self.dump(
            NFT_MSG_GETSETELEM,
            family,
            NLM_F_DUMP,
            |nlh| {
                with_set(nlh, table, Some(set), |s, nlh| unsafe {
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, s)
                })
            },
            |nlh| {
                elems.extend(decode_elems(nlh)?);
                Ok(())
            },
        )?;
        Ok(found.then_some(elems))
    }

    /// One set with its elements; `None` when it does not exist.
    pub fn set(&mut self, family: u16, table: &str, name: &str) -> Result<Option<NftSet>, NftnlError> {
        let ct = CString::new(table).map_err(|_| NftnlError::Parse)?;
        let cs = CString::new(name).map_err(|_| NftnlError::Parse)?;
        let Some(mut set) = self.set_header_c(family, &ct, &cs)? else {
            return Ok(None);
        };
        let Some(elems) = self.elems(family, &ct, &cs)? else {
            return Ok(None);
        };
        set.elems = elems;
        Ok(Some(set))
    }

    /// One set without its elements; `None` when it does not exist.
    pub fn set_header(&mut self, family: u16, table: &str, name: &str) -> Result<Option<NftSet>, NftnlError> {
        let ct = CString::new(table).map_err(|_| NftnlError::Parse)?;
        let cs = CString::new(name).map_err(|_| NftnlError::Parse)?;
        self.set_header_c(family, &ct, &cs)
    }

    /// The elements of set `set` with exactly `keys`, asked for by key in requests of at most
    /// [`KEYS_PER_REQUEST`] (the kernel finds the set once per request and then each element by
    /// its key; a dump finds the set three times). `None` when the set or one of the keys does
    /// not exist.
    fn elems_by_keys(
        &mut self,
        family: u16,
        table: &CStr,
        set: &CStr,
        keys: &[Vec<u8>],
    ) -> Result<Option<Vec<NftElem>>, NftnlError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(KEYS_PER_REQUEST) {
            let found = self.dump(
                NFT_MSG_GETSETELEM,
                family,
                NLM_F_ACK,
                |nlh| {
                    with_set(nlh, table, Some(set), |s, nlh| unsafe {
                        for key in chunk {
                            let e = sys::nftnl_set_elem_alloc();
                            if e.is_null() {
                                return;
                            }
                            sys::nftnl_set_elem_set(
                                e,
                                sys::NFTNL_SET_ELEM_KEY as u16,
                                key.as_ptr().cast(),
                                key.len() as u32,
                            );
                            // The set owns the element from here and frees it with itself.
                            sys::nftnl_set_elem_add(s, e);
                        }
                        sys::nftnl_set_elems_nlmsg_build_payload(nlh, s)
                    })
                },
                |nlh| {
                    out.extend(decode_elems(nlh)?);
                    Ok(())
                },
            )?;
            if !found {
                return Ok(None);
            }
        }
        // Safety: an element missing from the answer would read as "not routed". Anything but
        // exactly one element per key asked for (a kernel that answers only the first, say)
        // counts as not found, so the caller dumps the set instead.
        Ok(answers_every_key(keys, &out).then_some(out))
    }

    /// [`Self::elems_by_keys`] by name: the elements of set `name` with exactly `keys`; `None`
    /// when the set or one of the keys does not exist.
    pub fn elems_by_key(
        &mut self,
        family: u16,
        table: &str,
        name: &str,
        keys: &[Vec<u8>],
    ) -> Result<Option<Vec<NftElem>>, NftnlError> {
        let ct = CString::new(table).map_err(|_| NftnlError::Parse)?;
        let cs = CString::new(name).map_err(|_| NftnlError::Parse)?;
        self.elems_by_keys(family, &ct, &cs, keys)
    }

    /// The element of set `name` with exactly `key` (the kernel looks it up: no dump of the
    /// set); `None` when the set has no such element.
    pub fn elem(&mut self, family: u16, table: &str, name: &str, key: &[u8]) -> Result<Option<NftElem>, NftnlError> {
        let found = self.elems_by_key(family, table, name, &[key.to_vec()])?;
        Ok(found.into_iter().flatten().find(|e| e.key == key))
    }

    fn set_header_c(&mut self, family: u16, ct: &CStr, cs: &CStr) -> Result<Option<NftSet>, NftnlError> {
        let mut header = None;
        let found = self.dump(
            NFT_MSG_GETSET,
            family,
            NLM_F_ACK,
            |nlh| {
                with_set(nlh, ct, Some(cs), |s, nlh| unsafe {
                    sys::nftnl_set_nlmsg_build_payload(nlh, s)
                })
            },
            |nlh| {
                header = Some(decode_set_header(nlh)?);
                Ok(())
            },
        )?;
        Ok(header.filter(|_| found))
    }

    /// Every rule of table `name` of `family`, in chain order; `None` when the table does not
    /// exist.
    pub fn rules(&mut self, family: u16, name: &str) -> Result<Option<Vec<NftRule>>, NftnlError> {
        let cname = CString::new(name).map_err(|_| NftnlError::Parse)?;
        // Dumps filtered by a missing table are simply empty: ask for the table itself first.
        let exists = self.dump(
            NFT_MSG_GETTABLE,
            family,
            NLM_F_ACK,
            |nlh| with_table(nlh, &cname),
            |_| Ok(()),
        )?;
        if !exists {
            return Ok(None);
        }
        let mut rules = Vec::new();
        let found = self.dump(
            NFT_MSG_GETRULE,
            family,
            NLM_F_DUMP,
            |nlh| with_rule_filter_chain(nlh, &cname, None),
            |nlh| {
                rules.push(decode_rule(nlh)?);
                Ok(())
            },
        )?;
        if !found {
            return Err(NftnlError::Interrupted); // the table went away between requests
        }
        Ok(Some(rules))
    }

    /// Dumps table `name` of `family`; `None` when the table does not exist.
    pub fn table(&mut self, family: u16, name: &str) -> Result<Option<NftTable>, NftnlError> {
        let cname = CString::new(name).map_err(|_| NftnlError::Parse)?;
        let Some(rules) = self.rules(family, name)? else {
            return Ok(None);
        };
        let mut table = NftTable {
            rules,
            ..Default::default()
        };
        let mut names = Vec::new();
        let sets_found = self.dump(
            NFT_MSG_GETSET,
            family,
            NLM_F_DUMP,
            |nlh| {
                with_set(nlh, &cname, None, |s, nlh| unsafe {
                    sys::nftnl_set_nlmsg_build_payload(nlh, s)
                })
            },
            |nlh| {
                names.push(decode_set_header(nlh)?);
                Ok(())
            },
        )?;
        if !sets_found {
            return Err(NftnlError::Interrupted); // the table went away between requests
        }
        let keyed = numgen_keys(&table.rules);
        for mut set in names {
            // Plain sets (cluster-ips, …) need no elements; verdict maps and data maps do.
            if set.data_type != Some(NFT_DATA_VERDICT) && set.flags & NFT_SET_MAP == 0 {
                table.sets.push(set);
                continue;
            }
            let cset = CString::new(set.name.clone()).map_err(|_| NftnlError::Parse)?;
            // kube-proxy's per-service vmaps are anonymous and chosen from by numgen: asking for
            // the keys numgen can produce costs the kernel one set lookup instead of three, and
            // a full read needs one such request per Service. A missing key (or anything else
            // unexpected) falls back to the dump.
            let by_key = match keyed.get(set.name.as_str()) {
                Some(keys) if set.flags & NFT_SET_ANONYMOUS != 0 => {
                    // An error here (a key layout the kernel refuses, say) also means: dump.
                    self.elems_by_keys(family, &cname, &cset, keys).ok().flatten()
                }
                _ => None,
            };
            // A set vanishing between the two dumps means the table is changing under us.
            let elems = match by_key {
                Some(elems) => elems,
                None => self.elems(family, &cname, &cset)?.ok_or(NftnlError::Interrupted)?,
            };
            set.elems = elems;
            table.sets.push(set);
        }
        Ok(Some(table))
    }
}

/// Whether `elems` hold exactly one element for each of `keys`, and nothing else.
fn answers_every_key(keys: &[Vec<u8>], elems: &[NftElem]) -> bool {
    let mut got: Vec<&[u8]> = elems.iter().map(|e| e.key.as_slice()).collect();
    let mut asked: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    got.sort_unstable();
    asked.sort_unstable();
    got == asked
}

/// Keys per keyed element request: each key takes about 20 bytes of the 8 KiB request buffer.
const KEYS_PER_REQUEST: usize = 128;

/// The largest numgen modulus whose vmap is read by key rather than dumped.
const MAX_KEYED_MODULUS: u32 = 65_536;

/// For each anonymous verdict map that a rule looks up with the number a `numgen` made, the
/// keys that lookup can produce (`offset .. offset + modulus`, in the register's host byte
/// order). Only those elements can ever be chosen: the others route nothing.
pub fn numgen_keys(rules: &[NftRule]) -> HashMap<&str, Vec<Vec<u8>>> {
    let mut out: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
    let mut ambiguous = HashSet::new();
    for rule in rules {
        // Only a lookup right after the numgen: nothing in between can have changed the number.
        let mut last_numgen: Option<(u32, u32, u32)> = None;
        for expr in &rule.exprs {
            match expr {
                Expr::Numgen { dreg, modulus, offset } => {
                    last_numgen = Some((*dreg, *modulus, *offset));
                    continue;
                }
                // A verdict map (dreg 0) or a data map (kube-proxy's DNAT maps).
                Expr::Lookup {
                    set,
                    sreg,
                    dreg: Some(_),
                } => match last_numgen {
                    Some((reg, modulus, offset))
                        if reg == *sreg
                            && (1..=MAX_KEYED_MODULUS).contains(&modulus)
                            && offset.checked_add(modulus).is_some() =>
                    {
                        let keys = (offset..offset + modulus).map(|k| k.to_ne_bytes().to_vec()).collect();
                        if out.insert(set, keys).is_some() {
                            ambiguous.insert(set.as_str());
                        }
                    }
                    _ => {
                        ambiguous.insert(set.as_str());
                    }
                },
                _ => {}
            }
            last_numgen = None;
        }
    }
    // A map looked up from two places (or not from a numgen) is read whole.
    out.retain(|set, _| !ambiguous.contains(set));
    out
}

fn with_table(nlh: *mut libc::nlmsghdr, table: &CStr) {
    // SAFETY: the table object is freed right after it is serialised into nlh.
    unsafe {
        let t = sys::nftnl_table_alloc();
        if t.is_null() {
            return;
        }
        sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, table.as_ptr());
        sys::nftnl_table_nlmsg_build_payload(nlh, t);
        sys::nftnl_table_free(t);
    }
}

fn with_rule_filter_chain(nlh: *mut libc::nlmsghdr, table: &CStr, chain: Option<&CStr>) {
    // SAFETY: the rule object is freed right after it is serialised into nlh.
    unsafe {
        let r = sys::nftnl_rule_alloc();
        if r.is_null() {
            return;
        }
        sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
        if let Some(c) = chain {
            sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, c.as_ptr());
        }
        sys::nftnl_rule_nlmsg_build_payload(nlh, r);
        sys::nftnl_rule_free(r);
    }
}

fn with_set(
    nlh: *mut libc::nlmsghdr,
    table: &CStr,
    name: Option<&CStr>,
    build: impl FnOnce(*mut sys::nftnl_set, *mut libc::nlmsghdr),
) {
    // SAFETY: the set object is freed right after it is serialised into nlh.
    unsafe {
        let s = sys::nftnl_set_alloc();
        if s.is_null() {
            return;
        }
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        if let Some(n) = name {
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, n.as_ptr());
        }
        build(s, nlh);
        sys::nftnl_set_free(s);
    }
}

pub(crate) fn decode_rule(nlh: *const libc::nlmsghdr) -> Result<NftRule, NftnlError> {
    // SAFETY: nlh is a complete nf_tables rule message; every object is freed before return.
    unsafe {
        let r = sys::nftnl_rule_alloc();
        if r.is_null() {
            return Err(NftnlError::Parse);
        }
        if sys::nftnl_rule_nlmsg_parse(nlh, r) < 0 {
            sys::nftnl_rule_free(r);
            return Err(NftnlError::Parse);
        }
        let chain = cstr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)).unwrap_or_default();
        let userdata = sys::nftnl_rule_is_set(r, sys::NFTNL_RULE_USERDATA as u16).then(|| {
            let mut len = 0u32;
            let p = sys::nftnl_rule_get_data(r, sys::NFTNL_RULE_USERDATA as u16, &mut len);
            bytes(p, len)
        });
        let mut exprs = Vec::new();
        let it = sys::nftnl_expr_iter_create(r);
        if !it.is_null() {
            let mut e = sys::nftnl_expr_iter_next(it);
            while !e.is_null() {
                exprs.push(decode_expr(e));
                e = sys::nftnl_expr_iter_next(it);
            }
            sys::nftnl_expr_iter_destroy(it);
        }
        sys::nftnl_rule_free(r);
        Ok(NftRule { chain, exprs, userdata })
    }
}

/// SAFETY: `e` must be a live expression of a live rule.
unsafe fn decode_expr(e: *mut sys::nftnl_expr) -> Expr {
    let is = |a: u32| unsafe { sys::nftnl_expr_is_set(e, a as u16) };
    let u32_of = |a: u32| unsafe { sys::nftnl_expr_get_u32(e, a as u16) };
    let str_of = |a: u32| cstr(unsafe { sys::nftnl_expr_get_str(e, a as u16) }).unwrap_or_default();
    let data_of = |a: u32| {
        let mut len = 0u32;
        // SAFETY: libnftnl returns a pointer to `len` bytes it owns, or NULL.
        bytes(unsafe { sys::nftnl_expr_get(e, a as u16, &mut len) }, len)
    };
    let name = str_of(sys::NFTNL_EXPR_NAME);
    match name.as_str() {
        "immediate" => {
            if is(sys::NFTNL_EXPR_IMM_VERDICT) {
                let chain = if is(sys::NFTNL_EXPR_IMM_CHAIN) {
                    cstr(unsafe { sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_IMM_CHAIN as u16) })
                } else {
                    None
                };
                return Expr::Verdict {
                    code: u32_of(sys::NFTNL_EXPR_IMM_VERDICT) as i32,
                    chain,
                };
            }
            Expr::Immediate {
                dreg: u32_of(sys::NFTNL_EXPR_IMM_DREG),
                data: data_of(sys::NFTNL_EXPR_IMM_DATA),
            }
        }
        "payload" => Expr::Payload {
            base: u32_of(sys::NFTNL_EXPR_PAYLOAD_BASE),
            offset: u32_of(sys::NFTNL_EXPR_PAYLOAD_OFFSET),
            len: u32_of(sys::NFTNL_EXPR_PAYLOAD_LEN),
            // A payload write (`sreg`) has no dreg; u32::MAX matches no register.
            dreg: if is(sys::NFTNL_EXPR_PAYLOAD_DREG) {
                u32_of(sys::NFTNL_EXPR_PAYLOAD_DREG)
            } else {
                u32::MAX
            },
        },
        "meta" => Expr::Meta {
            key: u32_of(sys::NFTNL_EXPR_META_KEY),
            dreg: is(sys::NFTNL_EXPR_META_DREG).then(|| u32_of(sys::NFTNL_EXPR_META_DREG)),
        },
        "cmp" => Expr::Cmp {
            sreg: u32_of(sys::NFTNL_EXPR_CMP_SREG),
            op: u32_of(sys::NFTNL_EXPR_CMP_OP),
            data: data_of(sys::NFTNL_EXPR_CMP_DATA),
        },
        "bitwise" => Expr::Bitwise {
            sreg: u32_of(sys::NFTNL_EXPR_BITWISE_SREG),
            dreg: u32_of(sys::NFTNL_EXPR_BITWISE_DREG),
        },
        "match" => Expr::Match {
            name: str_of(sys::NFTNL_EXPR_MT_NAME),
            rev: u32_of(sys::NFTNL_EXPR_MT_REV),
            info: data_of(sys::NFTNL_EXPR_MT_INFO),
        },
        "target" => Expr::Target {
            name: str_of(sys::NFTNL_EXPR_TG_NAME),
            rev: u32_of(sys::NFTNL_EXPR_TG_REV),
            info: data_of(sys::NFTNL_EXPR_TG_INFO),
        },
        "lookup" => Expr::Lookup {
            set: cstr(unsafe { sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_LOOKUP_SET as u16) }).unwrap_or_default(),
            sreg: u32_of(sys::NFTNL_EXPR_LOOKUP_SREG),
            dreg: is(sys::NFTNL_EXPR_LOOKUP_DREG).then(|| u32_of(sys::NFTNL_EXPR_LOOKUP_DREG)),
        },
        // A numgen that does its own map lookup (an old kernel feature) stays `Other`.
        "numgen" if !is(sys::NFTNL_EXPR_NG_SET_NAME) && is(sys::NFTNL_EXPR_NG_MODULUS) => Expr::Numgen {
            dreg: u32_of(sys::NFTNL_EXPR_NG_DREG),
            modulus: u32_of(sys::NFTNL_EXPR_NG_MODULUS),
            offset: if is(sys::NFTNL_EXPR_NG_OFFSET) {
                u32_of(sys::NFTNL_EXPR_NG_OFFSET)
            } else {
                0
            },
        },
        "nat" => Expr::Nat {
            kind: u32_of(sys::NFTNL_EXPR_NAT_TYPE),
            addr_reg: is(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN).then(|| u32_of(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN)),
            addr_max_reg: is(sys::NFTNL_EXPR_NAT_REG_ADDR_MAX).then(|| u32_of(sys::NFTNL_EXPR_NAT_REG_ADDR_MAX)),
            proto_reg: is(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN).then(|| u32_of(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN)),
            proto_max_reg: is(sys::NFTNL_EXPR_NAT_REG_PROTO_MAX).then(|| u32_of(sys::NFTNL_EXPR_NAT_REG_PROTO_MAX)),
        },
        _ => Expr::Other(name),
    }
}

pub(crate) fn decode_set_header(nlh: *const libc::nlmsghdr) -> Result<NftSet, NftnlError> {
    // SAFETY: nlh is a complete nf_tables set message; the set is freed before return.
    unsafe {
        let s = sys::nftnl_set_alloc();
        if s.is_null() || sys::nftnl_set_nlmsg_parse(nlh, s) < 0 {
            if !s.is_null() {
                sys::nftnl_set_free(s);
            }
            return Err(NftnlError::Parse);
        }
        let set = NftSet {
            name: cstr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)).unwrap_or_default(),
            flags: sys::nftnl_set_get_u32(s, sys::NFTNL_SET_FLAGS as u16),
            data_type: sys::nftnl_set_is_set(s, sys::NFTNL_SET_DATA_TYPE as u16)
                .then(|| sys::nftnl_set_get_u32(s, sys::NFTNL_SET_DATA_TYPE as u16)),
            elems: Vec::new(),
        };
        sys::nftnl_set_free(s);
        Ok(set)
    }
}

pub(crate) fn decode_elems(nlh: *const libc::nlmsghdr) -> Result<Vec<NftElem>, NftnlError> {
    // SAFETY: nlh is a complete set-element message; the set owns the elements and is freed last.
    unsafe {
        let s = sys::nftnl_set_alloc();
        if s.is_null() || sys::nftnl_set_elems_nlmsg_parse(nlh, s) < 0 {
            if !s.is_null() {
                sys::nftnl_set_free(s);
            }
            return Err(NftnlError::Parse);
        }
        let mut out = Vec::new();
        let it = sys::nftnl_set_elems_iter_create(s);
        if !it.is_null() {
            // Like nft itself: iter_next yields each element in turn, then NULL.
            let mut e = sys::nftnl_set_elems_iter_next(it);
            while !e.is_null() {
                let mut len = 0u32;
                let p = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
                let key = if p.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(p.cast::<u8>(), len as usize).to_vec()
                };
                let verdict = sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_VERDICT as u16).then(|| {
                    let code = sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16) as i32;
                    let chain = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_CHAIN as u16) {
                        cstr(sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16))
                    } else {
                        None
                    };
                    (code, chain)
                });
                let data = sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_DATA as u16)
                    .then(|| {
                        let mut len = 0u32;
                        let p = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_DATA as u16, &mut len);
                        (!p.is_null()).then(|| std::slice::from_raw_parts(p.cast::<u8>(), len as usize).to_vec())
                    })
                    .flatten();
                out.push(NftElem { key, verdict, data });
                e = sys::nftnl_set_elems_iter_next(it);
            }
            sys::nftnl_set_elems_iter_destroy(it);
        }
        sys::nftnl_set_free(s);
        Ok(out)
    }
}

/// The one `ip:port` a native DNAT (`dnat to IP:PORT`, as nft and kube-proxy write it) sends
/// to, from the registers the rule's immediates loaded. Anything else is an error saying why:
/// a range (`dnat to A-B:P` picks among several endpoints), a missing port, a register not
/// loaded by an immediate. The one decoder for both the nftables and the iptables-nft readers.
pub fn dnat_target(expr: &Expr, regs: &std::collections::HashMap<u32, &[u8]>) -> Result<std::net::SocketAddr, String> {
    let Expr::Nat {
        addr_reg,
        addr_max_reg,
        proto_reg,
        proto_max_reg,
        ..
    } = expr
    else {
        return Err("not a NAT expression".into());
    };
    let load = |reg: Option<u32>| reg.and_then(|r| regs.get(&r).copied());
    let ranged = |min: Option<u32>, max: Option<u32>| max.is_some_and(|m| Some(m) != min && load(Some(m)) != load(min));
    if ranged(*addr_reg, *addr_max_reg) || ranged(*proto_reg, *proto_max_reg) {
        return Err("DNAT to a range of addresses or ports: which endpoint gets a connection is not known".into());
    }
    let addr = load(*addr_reg).and_then(ip_from);
    let port = load(*proto_reg)
        .filter(|b| b.len() >= 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]));
    match (addr, port) {
        (Some(a), Some(p)) => Ok(std::net::SocketAddr::new(a, p)),
        _ => Err("DNAT without an immediate address and port".into()),
    }
}

/// An address as nf_tables carries it: 4 bytes (IPv4) or 16 (IPv6).
pub fn ip_from(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(exprs: Vec<Expr>) -> NftRule {
        NftRule {
            chain: "service-X".into(),
            exprs,
            userdata: None,
        }
    }

    fn lookup(set: &str, sreg: u32) -> Expr {
        Expr::Lookup {
            set: set.into(),
            sreg,
            dreg: Some(0),
        }
    }

    const NG: Expr = Expr::Numgen {
        dreg: 1,
        modulus: 3,
        offset: 0,
    };

    #[test]
    fn a_vmap_chosen_from_by_numgen_is_read_by_the_keys_numgen_can_produce() {
        let rules = [rule(vec![NG, lookup("__map0", 1)])];
        let keys = numgen_keys(&rules);
        let want: Vec<Vec<u8>> = (0u32..3).map(|k| k.to_ne_bytes().to_vec()).collect();
        assert_eq!(keys.get("__map0"), Some(&want));
        let rules = [rule(vec![
            Expr::Numgen {
                dreg: 1,
                modulus: 2,
                offset: 5,
            },
            lookup("__map1", 1),
        ])];
        let offset = numgen_keys(&rules);
        let want: Vec<Vec<u8>> = (5u32..7).map(|k| k.to_ne_bytes().to_vec()).collect();
        assert_eq!(offset.get("__map1"), Some(&want));
    }

    #[test]
    fn a_keyed_answer_counts_only_with_one_element_per_key() {
        let key = |k: u32| k.to_ne_bytes().to_vec();
        let elem = |k: u32| NftElem {
            key: key(k),
            verdict: Some((NFT_GOTO, Some(format!("endpoint-{k}")))),
            data: None,
        };
        let keys = [key(0), key(1), key(2)];
        assert!(answers_every_key(&keys, &[elem(2), elem(0), elem(1)]));
        assert!(
            !answers_every_key(&keys, &[elem(0)]),
            "a kernel answering the first key only"
        );
        assert!(!answers_every_key(&keys, &[elem(0), elem(1), elem(1)]));
        assert!(!answers_every_key(&keys, &[elem(0), elem(1), elem(2), elem(3)]));
    }

    #[test]
    fn any_other_way_to_a_vmap_reads_it_whole() {
        // Another register, something between numgen and lookup, no numgen at all, a
        // modulus of 0, two lookups of one map: no keys, so the reader dumps the map.
        let cases = [
            vec![rule(vec![NG, lookup("m", 2)])],
            vec![rule(vec![
                NG,
                Expr::Meta {
                    key: NFT_META_L4PROTO,
                    dreg: Some(1),
                },
                lookup("m", 1),
            ])],
            vec![rule(vec![lookup("m", 1)])],
            vec![rule(vec![
                Expr::Numgen {
                    dreg: 1,
                    modulus: 0,
                    offset: 0,
                },
                lookup("m", 1),
            ])],
            vec![
                rule(vec![NG, lookup("m", 1)]),
                rule(vec![Expr::Other("hash".into()), lookup("m", 1)]),
            ],
            vec![rule(vec![NG, lookup("m", 1)]), rule(vec![NG, lookup("m", 1)])],
        ];
        for rules in cases {
            assert!(numgen_keys(&rules).is_empty(), "{rules:?}");
        }
    }
}
