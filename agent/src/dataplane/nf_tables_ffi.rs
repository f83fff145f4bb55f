//! A thin, safe layer over libnftnl (nftnl-sys): dumps one nf_tables table's rules, sets and
//! set elements over netlink and decodes them into plain Rust values. It interprets nothing;
//! the nftables and iptables-nft readers decide what the values mean.
//!
//! Every libnftnl object is owned by a guard that frees it when dropped; a request buffer is
//! sized from what the request carries before libnftnl (which checks no bounds) writes into
//! it; an allocation that fails is an error, never a request without its filter. A reply is
//! handed to libnftnl only in a shape it survives (`nf_tables_shape`): libnftnl ends the
//! process on some malformed messages, and the agent must fail the read instead.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::c_char;

use netlink_sys::protocols::NETLINK_NETFILTER;
use nftnl_sys as sys;

use super::netlink::{Ending, Message, NetlinkError, NetlinkSocket, NLM_F_ACK, NLM_F_DUMP};
use super::nf_tables_shape::{libnftnl_survives, Parse};

use crate::netns::NetNs;

pub const NFPROTO_IPV4: u16 = 2;
pub const NFPROTO_IPV6: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
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
pub enum NfTablesError {
    #[error(transparent)]
    RequestFailed(#[from] NetlinkError),
    #[error("the ruleset changed during the dump")]
    DumpInterrupted,
    #[error("libnftnl could not allocate a {0} object")]
    AllocFailed(&'static str),
    #[error("building an nf_tables request: {0}")]
    BuildFailed(String),
    #[error("libnftnl could not parse a {0} message")]
    DecodeFailed(&'static str),
    /// A message libnftnl would end the process on (`nf_tables_shape`): the kernel never
    /// sends one, so the reading confirms nothing.
    #[error("an nf_tables {0} message is malformed (an attribute of the wrong size or a missing name); not handed to libnftnl")]
    ShapeRefused(&'static str),
}

/// Defines the owner of one libnftnl object: allocated by `$alloc`, freed by `$free` when the
/// owner is dropped, on every path.
macro_rules! owned {
    ($(#[$doc:meta])* $owner:ident, $object:ty, $alloc:path, $free:path) => {
        $(#[$doc])*
        struct $owner(std::ptr::NonNull<$object>);

        impl $owner {
            fn new() -> Result<Self, NfTablesError> {
                // SAFETY: the allocator takes no arguments; a NULL (out of memory) is an error.
                let object = unsafe { $alloc() };
                std::ptr::NonNull::new(object)
                    .map(Self)
                    .ok_or(NfTablesError::AllocFailed(stringify!($object)))
            }

            fn as_ptr(&self) -> *mut $object {
                self.0.as_ptr()
            }
        }

        impl Drop for $owner {
            fn drop(&mut self) {
                // SAFETY: the object came from the matching allocator, this owner is its only
                // one, and it is freed exactly once, here.
                unsafe { $free(self.0.as_ptr()) }
            }
        }
    };
}

owned!(Table, sys::nftnl_table, sys::nftnl_table_alloc, sys::nftnl_table_free);
owned!(Chain, sys::nftnl_chain, sys::nftnl_chain_alloc, sys::nftnl_chain_free);
owned!(Rule, sys::nftnl_rule, sys::nftnl_rule_alloc, sys::nftnl_rule_free);
owned!(
    /// A set; it also owns (and frees) the elements added to it.
    Set,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);
owned!(
    /// An element not yet handed to a set.
    SetElem,
    sys::nftnl_set_elem,
    sys::nftnl_set_elem_alloc,
    sys::nftnl_set_elem_free
);

impl SetElem {
    /// Hands the element to `set`, which frees it with itself.
    fn add_to(self, set: &Set) {
        let elem = std::mem::ManuallyDrop::new(self);
        // SAFETY: both objects are live; the set takes ownership of the element, and the
        // ManuallyDrop keeps this guard from freeing it too.
        unsafe { sys::nftnl_set_elem_add(set.as_ptr(), elem.as_ptr()) }
    }
}

/// Defines an iterator over the children of a libnftnl object (`$parent`), created by
/// `$create`, advanced by `$next` (each child, then NULL) and destroyed by `$destroy` when
/// dropped. The children live as long as the parent, which the iterator borrows.
macro_rules! children {
    ($(#[$doc:meta])* $iter:ident, $parent:ty, $raw:ty, $child:ty, $create:path, $next:path, $destroy:path) => {
        $(#[$doc])*
        struct $iter<'p> {
            iter: std::ptr::NonNull<$raw>,
            _parent: std::marker::PhantomData<&'p $parent>,
        }

        impl<'p> $iter<'p> {
            fn of(parent: &'p $parent) -> Result<Self, NfTablesError> {
                // SAFETY: the parent is live for 'p, which this iterator cannot outlive.
                let iter = unsafe { $create(parent.as_ptr()) };
                std::ptr::NonNull::new(iter)
                    .map(|iter| Self {
                        iter,
                        _parent: std::marker::PhantomData,
                    })
                    .ok_or(NfTablesError::AllocFailed(stringify!($raw)))
            }
        }

        impl Iterator for $iter<'_> {
            type Item = std::ptr::NonNull<$child>;

            fn next(&mut self) -> Option<Self::Item> {
                // SAFETY: a live iterator of a live parent; it yields each child, then NULL.
                std::ptr::NonNull::new(unsafe { $next(self.iter.as_ptr()) })
            }
        }

        impl Drop for $iter<'_> {
            fn drop(&mut self) {
                // SAFETY: created by the matching create function, destroyed once, here.
                unsafe { $destroy(self.iter.as_ptr()) }
            }
        }
    };
}

children!(
    /// The expressions of a rule, in order.
    Exprs,
    Rule,
    sys::nftnl_expr_iter,
    sys::nftnl_expr,
    sys::nftnl_expr_iter_create,
    sys::nftnl_expr_iter_next,
    sys::nftnl_expr_iter_destroy
);
children!(
    /// The elements of a set, in order (as nft itself walks them).
    Elems,
    Set,
    sys::nftnl_set_elems_iter,
    sys::nftnl_set_elem,
    sys::nftnl_set_elems_iter_create,
    sys::nftnl_set_elems_iter_next,
    sys::nftnl_set_elems_iter_destroy
);

/// Copies a string libnftnl owns (`None` for NULL).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid during the call.
unsafe fn cstr(p: *const c_char) -> Option<String> {
    // SAFETY: the caller's contract.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies `len` bytes libnftnl owns (empty for NULL).
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid during the call.
unsafe fn bytes(p: *const std::ffi::c_void, len: u32) -> Vec<u8> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec()
}

fn c_string(what: &str, s: &str) -> Result<CString, NfTablesError> {
    CString::new(s).map_err(|_| NfTablesError::BuildFailed(format!("{what} {s:?} contains a NUL byte")))
}

/// The header and fixed payload of a request, before its attributes.
const REQUEST_HEADER: usize = 16 + 4;
/// Room for one string attribute besides its bytes: its header, NUL and padding.
const STRING_ATTR: usize = 8;
/// Room for one set element besides its key: nests, headers and padding (libnftnl writes
/// a list entry, a key nest and the key's data: 12 bytes and at most 3 of padding).
const ELEM_ATTR: usize = 32;

/// A request libnftnl builds: the buffer is sized before libnftnl writes into it (its
/// builders do not check bounds), from what the request will carry.
struct Request {
    buf: Vec<u64>,
}

impl Request {
    /// A request with room for `strings` and set element `keys` besides its header.
    fn new<'a>(strings: Vec<&CStr>, keys: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let room = REQUEST_HEADER
            + 64
            + strings
                .into_iter()
                .map(|s| s.to_bytes().len() + STRING_ATTR)
                .sum::<usize>()
            + keys.into_iter().map(|k| k.len() + ELEM_ATTR).sum::<usize>();
        Self {
            buf: vec![0u64; room.div_ceil(8)],
        }
    }

    fn capacity(&self) -> usize {
        self.buf.len() * 8
    }

    /// Writes the header and lets `build` add the payload; returns the message's bytes.
    fn build(
        &mut self,
        cmd: u16,
        family: u16,
        flags: u16,
        seq: u32,
        build: impl FnOnce(*mut libc::nlmsghdr) -> Result<(), NfTablesError>,
    ) -> Result<&[u8], NfTablesError> {
        // SAFETY: the buffer is 8-byte aligned and larger than a header with its nfgenmsg,
        // which is all this call writes.
        let nlh = unsafe { sys::nftnl_nlmsg_build_hdr(self.buf.as_mut_ptr().cast(), cmd, family, flags, seq) };
        build(nlh)?;
        // SAFETY: nlh points to the header just written at the start of the buffer.
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        if len > self.capacity() {
            // The room is reckoned from what the builders add; reaching here means that
            // reckoning is wrong, and the message must not be sent.
            return Err(NfTablesError::BuildFailed(format!(
                "the request grew to {len} bytes, past the {} reckoned",
                self.capacity()
            )));
        }
        // SAFETY: the buffer holds at least `len` bytes, all initialised (zeroed, then
        // written by libnftnl); the slice borrows the buffer.
        Ok(unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), len) })
    }
}

/// What a request asks for; the kind of object decides the request's command.
enum Filter<'a> {
    Table(&'a CStr),
    Chain {
        table: &'a CStr,
        chain: &'a CStr,
    },
    /// Rules of a table, of one chain when given (the kernel filters by table only).
    Rules {
        table: &'a CStr,
        chain: Option<&'a CStr>,
    },
    /// A set's header, or every set header of the table.
    Sets {
        table: &'a CStr,
        set: Option<&'a CStr>,
    },
    /// Elements of a set: all of them (no keys), or those with these keys.
    Elems {
        table: &'a CStr,
        set: &'a CStr,
        keys: &'a [Vec<u8>],
    },
}

impl Filter<'_> {
    fn command(&self) -> u16 {
        match self {
            Filter::Table(_) => NFT_MSG_GETTABLE,
            Filter::Chain { .. } => NFT_MSG_GETCHAIN,
            Filter::Rules { .. } => NFT_MSG_GETRULE,
            Filter::Sets { .. } => NFT_MSG_GETSET,
            Filter::Elems { .. } => NFT_MSG_GETSETELEM,
        }
    }

    /// A request with room for this filter.
    fn request(&self) -> Request {
        let strings: Vec<&CStr> = match *self {
            Filter::Table(t) => vec![t],
            Filter::Chain { table, chain } => vec![table, chain],
            Filter::Rules { table, chain } => [Some(table), chain].into_iter().flatten().collect(),
            Filter::Sets { table, set } => [Some(table), set].into_iter().flatten().collect(),
            Filter::Elems { table, set, .. } => vec![table, set],
        };
        let keys: &[Vec<u8>] = match self {
            Filter::Elems { keys, .. } => keys,
            _ => &[],
        };
        Request::new(strings, keys.iter().map(Vec::as_slice))
    }

    /// Serialises the filter as the payload of the request at `nlh`.
    ///
    /// # Safety
    /// `nlh` is the header libnftnl wrote at the start of the buffer of `self.request()`,
    /// which has room for what this writes.
    unsafe fn write(&self, nlh: *mut libc::nlmsghdr) -> Result<(), NfTablesError> {
        match *self {
            Filter::Table(name) => {
                let t = Table::new()?;
                // SAFETY: a live table; libnftnl copies the string; the caller guarantees room.
                unsafe {
                    sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
                    sys::nftnl_table_nlmsg_build_payload(nlh, t.as_ptr());
                }
            }
            Filter::Chain { table, chain } => {
                let c = Chain::new()?;
                // SAFETY: a live chain; libnftnl copies the strings; the caller guarantees room.
                unsafe {
                    sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
                    sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_NAME as u16, chain.as_ptr());
                    sys::nftnl_chain_nlmsg_build_payload(nlh, c.as_ptr());
                }
            }
            Filter::Rules { table, chain } => {
                let r = Rule::new()?;
                // SAFETY: a live rule; libnftnl copies the strings; the caller guarantees room.
                unsafe {
                    sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
                    if let Some(c) = chain {
                        sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, c.as_ptr());
                    }
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r.as_ptr());
                }
            }
            Filter::Sets { table, set } => {
                let s = named_set(table, set)?;
                // SAFETY: a live set; the caller guarantees room.
                unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, s.as_ptr()) };
            }
            Filter::Elems { table, set, keys } => {
                let s = named_set(table, Some(set))?;
                for key in keys {
                    let len = u32::try_from(key.len())
                        .map_err(|_| NfTablesError::BuildFailed("a set element key is too long".into()))?;
                    let e = SetElem::new()?;
                    // SAFETY: a live element; libnftnl copies the `len` bytes of the key.
                    unsafe {
                        sys::nftnl_set_elem_set(e.as_ptr(), sys::NFTNL_SET_ELEM_KEY as u16, key.as_ptr().cast(), len)
                    };
                    e.add_to(&s);
                }
                // SAFETY: a live set with its elements; the caller guarantees room.
                unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.as_ptr()) };
            }
        }
        Ok(())
    }
}

/// A set object naming table `table` and, when given, set `name`.
fn named_set(table: &CStr, name: Option<&CStr>) -> Result<Set, NfTablesError> {
    let s = Set::new()?;
    // SAFETY: a live set; libnftnl copies the strings.
    unsafe {
        sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        if let Some(n) = name {
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_NAME as u16, n.as_ptr());
        }
    }
    Ok(s)
}

/// A netlink socket speaking nf_tables, opened in a given network namespace.
pub struct NftConn {
    sock: NetlinkSocket,
}

impl NftConn {
    pub fn open(netns: &NetNs) -> Result<Self, NfTablesError> {
        let sock = NetlinkSocket::open(netns, NETLINK_NETFILTER, 512 * 1024)?;
        sock.grow_kernel_buffer(8 * 1024 * 1024);
        Ok(Self { sock })
    }

    /// The receive deadline of this connection's socket.
    pub fn recv_deadline(&self) -> io::Result<Option<std::time::Duration>> {
        self.sock.recv_deadline()
    }

    /// Sends one request for `filter` and hands every reply message to `each`. Returns
    /// Ok(false) when the kernel answered ENOENT (no such table, chain or set).
    fn dump(
        &mut self,
        family: u16,
        flags: u16,
        filter: Filter<'_>,
        each: impl FnMut(Message<'_>) -> Result<(), NfTablesError>,
    ) -> Result<bool, NfTablesError> {
        let mut request = filter.request();
        let seq = self.sock.next_seq();
        // SAFETY: the header is the one `build` wrote into the request made for this filter.
        let msg = request.build(filter.command(), family, flags, seq, |nlh| unsafe { filter.write(nlh) })?;
        match self.sock.request(msg, each) {
            Ok(Ending::Done | Ending::Ack) => Ok(true),
            Err(NfTablesError::RequestFailed(e)) if e.refused_with() == Some(libc::ENOENT) => Ok(false),
            Err(NfTablesError::RequestFailed(NetlinkError::DumpInterrupted)) => Err(NfTablesError::DumpInterrupted),
            Err(e) => Err(e),
        }
    }

    /// Every object the request for `filter` answers with, decoded by `decode`; `None` when
    /// the kernel has no such table, chain or set.
    fn collect<T>(
        &mut self,
        family: u16,
        flags: u16,
        filter: Filter<'_>,
        decode: impl Fn(Message<'_>) -> Result<T, NfTablesError>,
    ) -> Result<Option<Vec<T>>, NfTablesError> {
        let mut out = Vec::new();
        let found = self.dump(family, flags, filter, |msg| {
            out.push(decode(msg)?);
            Ok(())
        })?;
        Ok(found.then_some(out))
    }

    /// Whether table `name` exists in `family`.
    pub fn table_exists(&mut self, family: u16, name: &str) -> Result<bool, NfTablesError> {
        let table = c_string("table", name)?;
        self.dump(family, NLM_F_ACK, Filter::Table(&table), |_| Ok(()))
    }

    /// Whether chain `chain` exists in table `table` of `family` (one small request).
    pub fn chain_exists(&mut self, family: u16, table: &str, chain: &str) -> Result<bool, NfTablesError> {
        let (table, chain) = (c_string("table", table)?, c_string("chain", chain)?);
        let filter = Filter::Chain {
            table: &table,
            chain: &chain,
        };
        self.dump(family, NLM_F_ACK, filter, |_| Ok(()))
    }

    /// The rules of one chain; empty when the chain does not exist.
    pub fn chain_rules(&mut self, family: u16, table: &str, chain: &str) -> Result<Vec<NftRule>, NfTablesError> {
        let (ct, cc) = (c_string("table", table)?, c_string("chain", chain)?);
        let filter = Filter::Rules {
            table: &ct,
            chain: Some(&cc),
        };
        let mut rules = self
            .collect(family, NLM_F_DUMP, filter, decode_rule)?
            .unwrap_or_default();
        // The kernel filters dumps by table; keep only the chain asked for.
        rules.retain(|r| r.chain == chain);
        Ok(rules)
    }

    /// The elements of one set with `keys` (all of them without keys); `None` when the set
    /// does not exist.
    fn elems(
        &mut self,
        family: u16,
        table: &CStr,
        set: &CStr,
        keys: &[Vec<u8>],
        flags: u16,
    ) -> Result<Option<Vec<NftElem>>, NfTablesError> {
        let found = self.collect(family, flags, Filter::Elems { table, set, keys }, decode_elems)?;
        Ok(found.map(|each| each.into_iter().flatten().collect()))
    }

    /// One set with its elements; `None` when it does not exist.
    pub fn set(&mut self, family: u16, table: &str, name: &str) -> Result<Option<NftSet>, NfTablesError> {
        let (ct, cs) = (c_string("table", table)?, c_string("set", name)?);
        let Some(mut set) = self.set_header_c(family, &ct, &cs)? else {
            return Ok(None);
        };
        let Some(elems) = self.elems(family, &ct, &cs, &[], NLM_F_DUMP)? else {
            return Ok(None);
        };
        set.elems = elems;
        Ok(Some(set))
    }

    /// One set without its elements; `None` when it does not exist.
    pub fn set_header(&mut self, family: u16, table: &str, name: &str) -> Result<Option<NftSet>, NfTablesError> {
        let (ct, cs) = (c_string("table", table)?, c_string("set", name)?);
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
    ) -> Result<Option<Vec<NftElem>>, NfTablesError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(KEYS_PER_REQUEST) {
            match self.elems(family, table, set, chunk, NLM_F_ACK)? {
                Some(elems) => out.extend(elems),
                None => return Ok(None),
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
    ) -> Result<Option<Vec<NftElem>>, NfTablesError> {
        let (ct, cs) = (c_string("table", table)?, c_string("set", name)?);
        self.elems_by_keys(family, &ct, &cs, keys)
    }

    /// The element of set `name` with exactly `key` (the kernel looks it up: no dump of the
    /// set); `None` when the set has no such element.
    pub fn elem(&mut self, family: u16, table: &str, name: &str, key: &[u8]) -> Result<Option<NftElem>, NfTablesError> {
        let (ct, cs) = (c_string("table", table)?, c_string("set", name)?);
        let found = self.elems(family, &ct, &cs, &[key.to_vec()], NLM_F_ACK)?;
        only_the_key_asked_for(key, found)
    }

    fn set_header_c(&mut self, family: u16, table: &CStr, set: &CStr) -> Result<Option<NftSet>, NfTablesError> {
        let filter = Filter::Sets { table, set: Some(set) };
        let headers = self.collect(family, NLM_F_ACK, filter, decode_set_header)?;
        Ok(headers.and_then(|h| h.into_iter().last()))
    }

    /// Every rule of table `name` of `family`, in chain order; `None` when the table does not
    /// exist.
    pub fn rules(&mut self, family: u16, name: &str) -> Result<Option<Vec<NftRule>>, NfTablesError> {
        let table = c_string("table", name)?;
        // Dumps filtered by a missing table are simply empty: ask for the table itself first.
        if !self.dump(family, NLM_F_ACK, Filter::Table(&table), |_| Ok(()))? {
            return Ok(None);
        }
        let filter = Filter::Rules {
            table: &table,
            chain: None,
        };
        // The table going away between the two requests: the ruleset changed under the dump.
        let rules = self.collect(family, NLM_F_DUMP, filter, decode_rule)?;
        rules.ok_or(NfTablesError::DumpInterrupted).map(Some)
    }

    /// Dumps table `name` of `family`; `None` when the table does not exist.
    pub fn table(&mut self, family: u16, name: &str) -> Result<Option<NftTable>, NfTablesError> {
        let cname = c_string("table", name)?;
        let Some(rules) = self.rules(family, name)? else {
            return Ok(None);
        };
        let mut table = NftTable {
            rules,
            ..Default::default()
        };
        let filter = Filter::Sets {
            table: &cname,
            set: None,
        };
        // The table going away between requests: the ruleset changed under the dump.
        let names = self
            .collect(family, NLM_F_DUMP, filter, decode_set_header)?
            .ok_or(NfTablesError::DumpInterrupted)?;
        let keyed = numgen_keys(&table.rules);
        for mut set in names {
            // Plain sets (cluster-ips, …) need no elements; verdict maps and data maps do.
            if set.data_type != Some(NFT_DATA_VERDICT) && set.flags & NFT_SET_MAP == 0 {
                table.sets.push(set);
                continue;
            }
            let cset = c_string("set", &set.name)?;
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
                None => self
                    .elems(family, &cname, &cset, &[], NLM_F_DUMP)?
                    .ok_or(NfTablesError::DumpInterrupted)?,
            };
            set.elems = elems;
            table.sets.push(set);
        }
        Ok(Some(table))
    }
}

/// The answer to a lookup of one key: the kernel's "no such element" is `None`; an answer
/// that is not exactly that key's element is an error, never "no element" (which would read
/// as not routed).
fn only_the_key_asked_for(key: &[u8], found: Option<Vec<NftElem>>) -> Result<Option<NftElem>, NfTablesError> {
    match found {
        None => Ok(None),
        Some(mut elems) if elems.len() == 1 && elems[0].key == key => Ok(elems.pop()),
        Some(_) => Err(NfTablesError::DecodeFailed(
            "an element lookup answered with other elements",
        )),
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

/// Keys per keyed element request (each takes about 20 bytes of the request).
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

/// The header of `msg` as libnftnl reads it to parse it as `parse`: a `struct nlmsghdr *`,
/// so it must be aligned, and the message must have a shape libnftnl survives.
fn header_of(msg: &Message<'_>, parse: Parse, what: &'static str) -> Result<*const libc::nlmsghdr, NfTablesError> {
    let p = msg.bytes().as_ptr();
    if p.align_offset(std::mem::align_of::<libc::nlmsghdr>()) != 0 {
        return Err(NfTablesError::DecodeFailed(what));
    }
    if !libnftnl_survives(msg.bytes(), parse) {
        return Err(NfTablesError::ShapeRefused(what));
    }
    Ok(p.cast())
}

pub(crate) fn decode_rule(msg: Message<'_>) -> Result<NftRule, NfTablesError> {
    let nlh = header_of(&msg, Parse::Rule, "rule")?;
    let r = Rule::new()?;
    // SAFETY: nlh is an aligned, complete message (its bytes are exactly its nlmsg_len) of a
    // shape libnftnl survives, borrowed for the call; the rule is live and copies what it keeps.
    if unsafe { sys::nftnl_rule_nlmsg_parse(nlh, r.as_ptr()) } < 0 {
        return Err(NfTablesError::DecodeFailed("rule"));
    }
    // SAFETY: the string belongs to the live rule and is copied at once.
    let chain = unsafe { cstr(sys::nftnl_rule_get_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16)) }.unwrap_or_default();
    // SAFETY: the rule is live.
    let userdata = unsafe { sys::nftnl_rule_is_set(r.as_ptr(), sys::NFTNL_RULE_USERDATA as u16) }.then(|| {
        let mut len = 0u32;
        // SAFETY: libnftnl returns `len` bytes the live rule owns, or NULL; copied at once.
        unsafe {
            bytes(
                sys::nftnl_rule_get_data(r.as_ptr(), sys::NFTNL_RULE_USERDATA as u16, &mut len),
                len,
            )
        }
    });
    // SAFETY: each expression belongs to the rule, which outlives the iterator.
    let exprs = Exprs::of(&r)?.map(|e| unsafe { decode_expr(e) }).collect();
    Ok(NftRule { chain, exprs, userdata })
}

/// Decodes one expression.
///
/// # Safety
/// `e` is a live expression of a live rule.
unsafe fn decode_expr(e: std::ptr::NonNull<sys::nftnl_expr>) -> Expr {
    let e = e.as_ptr();
    // The accessors: `e` is live (the caller's contract), and strings and data are copied
    // before this function returns.
    // SAFETY: a live expression.
    let is = |a: u32| unsafe { sys::nftnl_expr_is_set(e, a as u16) };
    // SAFETY: a live expression.
    let u32_of = |a: u32| unsafe { sys::nftnl_expr_get_u32(e, a as u16) };
    // SAFETY: a live expression's string (or NULL), copied at once.
    let str_of = |a: u32| unsafe { cstr(sys::nftnl_expr_get_str(e, a as u16)) }.unwrap_or_default();
    let data_of = |a: u32| {
        let mut len = 0u32;
        // SAFETY: `len` bytes (or NULL) the live expression owns, copied at once.
        unsafe { bytes(sys::nftnl_expr_get(e, a as u16, &mut len), len) }
    };
    let name = str_of(sys::NFTNL_EXPR_NAME);
    match name.as_str() {
        "immediate" => {
            if is(sys::NFTNL_EXPR_IMM_VERDICT) {
                let chain = is(sys::NFTNL_EXPR_IMM_CHAIN).then(|| str_of(sys::NFTNL_EXPR_IMM_CHAIN));
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
            set: str_of(sys::NFTNL_EXPR_LOOKUP_SET),
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

pub(crate) fn decode_set_header(msg: Message<'_>) -> Result<NftSet, NfTablesError> {
    let nlh = header_of(&msg, Parse::Set, "set")?;
    let s = Set::new()?;
    // SAFETY: nlh is an aligned, complete message of a shape libnftnl survives, borrowed for
    // the call; the set is live.
    if unsafe { sys::nftnl_set_nlmsg_parse(nlh, s.as_ptr()) } < 0 {
        return Err(NfTablesError::DecodeFailed("set"));
    }
    let s = s.as_ptr();
    // SAFETY: the set is live until the end of this function.
    let u32_of = |a: u32| unsafe { sys::nftnl_set_get_u32(s, a as u16) };
    // SAFETY: the set is live until the end of this function.
    let is = |a: u32| unsafe { sys::nftnl_set_is_set(s, a as u16) };
    Ok(NftSet {
        // SAFETY: the live set's name (or NULL), copied at once.
        name: unsafe { cstr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)) }.unwrap_or_default(),
        flags: u32_of(sys::NFTNL_SET_FLAGS),
        data_type: is(sys::NFTNL_SET_DATA_TYPE).then(|| u32_of(sys::NFTNL_SET_DATA_TYPE)),
        elems: Vec::new(),
    })
}

pub(crate) fn decode_elems(msg: Message<'_>) -> Result<Vec<NftElem>, NfTablesError> {
    let nlh = header_of(&msg, Parse::SetElems, "set element")?;
    let s = Set::new()?;
    // SAFETY: nlh is an aligned, complete message of a shape libnftnl survives, borrowed for
    // the call; the set is live and owns the elements it parses.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(nlh, s.as_ptr()) } < 0 {
        return Err(NfTablesError::DecodeFailed("set element"));
    }
    // SAFETY: each element belongs to the set, which outlives the iterator.
    let out = Elems::of(&s)?.map(|e| unsafe { decode_elem(e) }).collect();
    Ok(out)
}

/// Decodes one set element.
///
/// # Safety
/// `e` is a live element of a live set.
unsafe fn decode_elem(e: std::ptr::NonNull<sys::nftnl_set_elem>) -> NftElem {
    let e = e.as_ptr();
    // The accessors: `e` is live (the caller's contract), and strings and data are copied
    // before this function returns.
    // SAFETY: a live element.
    let is = |a: u32| unsafe { sys::nftnl_set_elem_is_set(e, a as u16) };
    let data_of = |a: u32| {
        let mut len = 0u32;
        // SAFETY: a live element.
        let p = unsafe { sys::nftnl_set_elem_get(e, a as u16, &mut len) };
        // SAFETY: `len` bytes the live element owns, copied at once.
        (!p.is_null()).then(|| unsafe { bytes(p, len) })
    };
    let verdict = is(sys::NFTNL_SET_ELEM_VERDICT).then(|| {
        // SAFETY: a live element.
        let code = unsafe { sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16) } as i32;
        // SAFETY: the live element's chain name (or NULL), copied at once.
        let chain_of = || unsafe { cstr(sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16)) };
        (code, is(sys::NFTNL_SET_ELEM_CHAIN).then(chain_of).flatten())
    });
    NftElem {
        key: data_of(sys::NFTNL_SET_ELEM_KEY).unwrap_or_default(),
        verdict,
        data: is(sys::NFTNL_SET_ELEM_DATA)
            .then(|| data_of(sys::NFTNL_SET_ELEM_DATA))
            .flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::netlink;

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

    /// libnftnl writes without bounds: the request is sized from what it carries, whatever
    /// the names and keys.
    #[test]
    fn requests_have_room_for_what_they_carry() {
        let table = c_string("table", "kube-proxy").unwrap();
        let long = c_string("set", &"s".repeat(20_000)).unwrap();
        let keys: Vec<Vec<u8>> = (0..KEYS_PER_REQUEST * 4).map(|k| vec![k as u8; 24]).collect();
        for filter in [
            Filter::Table(&long),
            Filter::Chain {
                table: &table,
                chain: &long,
            },
            Filter::Rules {
                table: &long,
                chain: Some(&long),
            },
            Filter::Sets {
                table: &table,
                set: Some(&long),
            },
            Filter::Elems {
                table: &table,
                set: &long,
                keys: &keys,
            },
        ] {
            let mut request = filter.request();
            let capacity = request.capacity();
            // SAFETY: the header is the one `build` wrote into the request made for this filter.
            let msg = request
                .build(filter.command(), NFPROTO_IPV4, NLM_F_ACK, 1, |nlh| unsafe {
                    filter.write(nlh)
                })
                .unwrap();
            assert!(msg.len() <= capacity);
            let header = crate::dataplane::netlink::messages(msg).next().unwrap().unwrap();
            assert_eq!(header.bytes().len(), msg.len());
            assert!(msg.len() > 20_000, "the long name is in the request");
        }
    }

    /// libnftnl ends the process on an attribute of the wrong size ("kernel ABI is broken"):
    /// the decoder refuses such a message first, and this test lives to see the error.
    #[test]
    fn a_message_libnftnl_would_exit_on_is_a_decode_error() {
        let mut body = vec![NFPROTO_IPV4 as u8, 0, 0, 0];
        netlink::put_attribute(&mut body, 1, b"nat\0");
        // NFTA_RULE_HANDLE is a u64; four bytes of it make libnftnl call exit(1).
        netlink::put_attribute(&mut body, 3, &7u32.to_be_bytes());
        let mut msg = netlink::header(netlink::NLMSG_HDRLEN + body.len(), (10 << 8) | 6, 0, 1);
        msg.extend(body);
        let buf = netlink::RecvBuf::holding(&msg);
        let msg = netlink::messages(&buf.as_bytes()[..msg.len()]).next().unwrap().unwrap();
        let err = decode_rule(msg).unwrap_err();
        assert!(matches!(err, NfTablesError::ShapeRefused("rule")), "{err}");
    }

    /// Every message the kernel really sent (captured for the fuzz seeds) passes the checks
    /// and decodes.
    #[test]
    fn captured_kernel_messages_decode() {
        let messages = crate::dataplane::nf_tables_shape::captured::messages();
        for (i, (msg, what)) in messages.iter().enumerate() {
            let buf = netlink::RecvBuf::holding(msg);
            let msg = netlink::messages(&buf.as_bytes()[..msg.len()]).next().unwrap().unwrap();
            let decoded = match what {
                Parse::Rule => decode_rule(msg).map(drop),
                Parse::Set => decode_set_header(msg).map(drop),
                Parse::SetElems => decode_elems(msg).map(drop),
            };
            assert!(decoded.is_ok(), "message {i} ({what:?}): {decoded:?}");
        }
    }

    #[test]
    fn names_with_nul_bytes_are_refused_not_truncated() {
        let err = c_string("chain", "KUBE-SVC-X\0KUBE-SEP-Y").unwrap_err();
        assert!(matches!(err, NfTablesError::BuildFailed(_)), "{err}");
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

    /// A single-key lookup (the targeted nftables read of a frontend) answered with anything
    /// but that key's element fails the read instead of reading as "no element", which would
    /// make the frontend's endpoints not routed (found by review).
    #[test]
    fn a_one_key_lookup_answered_with_another_element_is_an_error() {
        let elem = |k: u8| NftElem {
            key: vec![k; 4],
            verdict: Some((NFT_GOTO, Some("service-x".into()))),
            data: None,
        };
        assert_eq!(only_the_key_asked_for(&[1; 4], None).unwrap(), None, "no such element");
        assert_eq!(
            only_the_key_asked_for(&[1; 4], Some(vec![elem(1)])).unwrap(),
            Some(elem(1))
        );
        for answer in [vec![], vec![elem(2)], vec![elem(1), elem(1)], vec![elem(2), elem(1)]] {
            assert!(
                only_the_key_asked_for(&[1; 4], Some(answer.clone())).is_err(),
                "{answer:?}"
            );
        }
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
