//! TUN offloads: the `virtio_net_hdr` in front of every packet on a TUN
//! opened with `IFF_VNET_HDR`, TCP receive coalescing before writing to the
//! TUN (one write of up to 64 KiB instead of one per packet), TCP
//! segmentation of the large packets the kernel hands over when TSO is
//! enabled on the TUN, and checksum completion.
//!
//! Why: the engine's side of a TUN costs one system call per packet and the
//! kernel then forwards, NATs and delivers each packet on its own. With a
//! virtio header the engine writes a TCP "super-packet" that the kernel
//! treats as one until (and unless) a device has to split it, and reads
//! one super-packet where the sender's TCP stack produced one. This is what
//! the kernel's own GRO/GSO do for a NIC (and what wireguard-go does since
//! 0.0.20230223); see ADR 0005.
//!
//! Coalescing is conservative, as the kernel's `tcp_gro_receive` is: only
//! pure ACK (optionally PSH on the last segment) segments with payload, of
//! one flow, in sequence, with identical IP fields that matter (TOS/TTL/DF
//! or traffic class/flow label/hop limit), acknowledgement number and TCP
//! options, consecutive IPv4 ids, no IP options or IPv6 extension headers,
//! all the size of the first except a shorter last one. Every segment's TCP
//! checksum is verified before it is merged (the kernel would have dropped
//! a corrupt one; merging must not turn it into a good one); the merged
//! packet carries the pseudo-header checksum and `NEEDS_CSUM`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether TUNs should be opened with offloads: yes, unless
/// `WARREN_WG_OFFLOAD=0` (for comparisons and as a way out should a kernel
/// misbehave).
pub fn wanted() -> bool {
    std::env::var("WARREN_WG_OFFLOAD").map_or(true, |v| v != "0")
}

/// `sizeof(struct virtio_net_hdr)`: the TUN's default vnet header size.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_*`.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// Most segments merged into one write.
const MAX_SEGS: usize = 64;
/// Most bytes in one merged packet (IPv4's total length field).
const MAX_BYTES: usize = 65_535;
/// How many recent groups a packet looks through for its flow.
const LOOKBACK: usize = 16;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const TCP_FIN: u8 = 0x01;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (legacy, native byte order as the TUN uses it
/// without `TUNSETVNETLE`/`BE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (a hint for the linear part).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The wire form.
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// Ones'-complement sum of `data` (as big-endian 16-bit words, an odd last
/// byte padded with zero) added to `acc`; fold with [`fold`].
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut last = [0u8; 8];
    let r = chunks.remainder();
    last[..r.len()].copy_from_slice(r);
    let w = u64::from_be_bytes(last);
    acc + (w >> 32) + (w & 0xffff_ffff)
}

/// Folds a sum from [`sum`] to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP/UDP pseudo-header sum of an IP packet whose transport header
/// starts at `l4`, for a transport length of `l4_len`.
fn pseudo_sum(pkt: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    sum(addrs, u64::from(proto) + l4_len as u64)
}

/// The IPv4 header checksum of `hdr` (its checksum field is ignored).
fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let s = sum(hdr, 0) + 0xffff - u64::from(u16::from_be_bytes([hdr[10], hdr[11]]));
    !fold(s)
}

/// What [`tcp_parse`] found in one packet.
#[derive(Debug, Clone, Copy)]
struct Tcp {
    v6: bool,
    /// IP header length (20 or 40: no options, no extension headers).
    ip_hl: usize,
    /// TCP header length.
    tcp_hl: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    /// IPv4 identification (0 for IPv6).
    id: u16,
}

impl Tcp {
    fn hdr_len(&self) -> usize {
        self.ip_hl + self.tcp_hl
    }
}

/// A TCP segment in a plain IPv4 (no options, not a fragment) or IPv6 (no
/// extension headers) packet whose lengths agree with `pkt`'s.
fn tcp_parse(pkt: &[u8]) -> Option<Tcp> {
    let (v6, ip_hl, id) = match pkt.first()? >> 4 {
        4 => {
            if pkt.len() < 40
                || pkt[0] != 0x45
                || pkt[9] != 6
                || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
                || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0
            {
                return None;
            }
            (false, 20, u16::from_be_bytes([pkt[4], pkt[5]]))
        }
        6 => {
            if pkt.len() < 60
                || pkt[6] != 6
                || usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 != pkt.len()
            {
                return None;
            }
            (true, 40, 0)
        }
        _ => return None,
    };
    let tcp_hl = usize::from(pkt[ip_hl + 12] >> 4) * 4;
    if tcp_hl < 20 || ip_hl + tcp_hl > pkt.len() {
        return None;
    }
    let t = &pkt[ip_hl..];
    Some(Tcp {
        v6,
        ip_hl,
        tcp_hl,
        payload: pkt.len() - ip_hl - tcp_hl,
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        id,
    })
}

/// Whether `pkt`'s TCP checksum is right.
fn tcp_checksum_ok(pkt: &[u8], t: &Tcp) -> bool {
    let l4 = &pkt[t.ip_hl..];
    fold(sum(l4, pseudo_sum(pkt, t.v6, 6, l4.len()))) == 0xffff
}

/// Whether two packets of the same shape belong to one flow and may share
/// one header: the same addresses and ports, the fields that must not
/// differ between merged segments, the same acknowledgement number, window
/// and options.
fn same_flow(a: &[u8], b: &[u8], t: &Tcp) -> bool {
    let ip_same = if t.v6 {
        // version/traffic class/flow label, next header + hop limit, addresses
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    } else {
        // TOS, DF, TTL + protocol, addresses
        a[1] == b[1] && a[6] == b[6] && a[8..10] == b[8..10] && a[12..20] == b[12..20]
    };
    let (ta, tb) = (&a[t.ip_hl..], &b[t.ip_hl..]);
    ip_same
        && ta[0..4] == tb[0..4]
        && ta[8..12] == tb[8..12]
        && ta[12] == tb[12]
        && ta[14..16] == tb[14..16]
        && ta[20..t.tcp_hl] == tb[20..t.tcp_hl]
}

/// A run of packets written with one `writev`.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// Index in `pkts` of the first packet (whose headers are kept).
    head: usize,
    /// Index of the last packet merged.
    tail: usize,
    count: usize,
    /// The first packet's TCP facts; `None`: written as it is.
    tcp: Option<Tcp>,
    /// Payload bytes over all segments.
    payload: usize,
    /// Sequence number the next segment must have.
    next_seq: u32,
    /// Takes no more segments.
    closed: bool,
    /// The first packet's checksum has been verified.
    head_checked: bool,
    /// A merged segment had PSH.
    psh: bool,
}

/// One packet in the batch buffer.
#[derive(Debug, Clone, Copy)]
struct Pkt {
    off: usize,
    len: usize,
    /// The next packet of its group (`usize::MAX`: none).
    next: usize,
}

/// Counters of what offloading did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes of a merged packet.
    pub gso_writes: u64,
    /// Packets that went into merged writes.
    pub coalesced: u64,
}

/// Collects the packets decrypted from one batch of datagrams and writes
/// them to a TUN with a virtio header, merging TCP segments.
#[derive(Debug)]
pub struct Coalescer {
    pkts: Vec<Pkt>,
    groups: Vec<Group>,
    /// Merge at all (turned off if the kernel refuses a merged write).
    merge: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            pkts: Vec::with_capacity(MAX_SEGS),
            groups: Vec::with_capacity(MAX_SEGS),
            merge: true,
        }
    }
}

impl Coalescer {
    /// Adds the packet at `buf[off..off + len]` (it must stay there until
    /// [`Coalescer::flush`]).
    pub fn push(&mut self, buf: &[u8], off: usize, len: usize) {
        let i = self.pkts.len();
        self.pkts.push(Pkt {
            off,
            len,
            next: usize::MAX,
        });
        let pkt = &buf[off..off + len];
        let tcp = if self.merge { tcp_parse(pkt) } else { None };
        if let Some(t) = tcp {
            let lo = self.groups.len().saturating_sub(LOOKBACK);
            let found = (lo..self.groups.len()).rev().find(|&g| {
                self.groups[g].tcp.is_some_and(|gt| {
                    gt.v6 == t.v6
                        && gt.tcp_hl == t.tcp_hl
                        && same_flow(head_bytes(buf, &self.pkts, &self.groups[g]), pkt, &t)
                })
            });
            if let Some(g) = found {
                if self.try_append(buf, g, i, &t) {
                    return;
                }
                self.groups[g].closed = true;
            }
        }
        let mergeable = tcp.filter(|t| t.payload > 0 && t.flags & !TCP_PSH == TCP_ACK);
        self.groups.push(Group {
            head: i,
            tail: i,
            count: 1,
            tcp,
            payload: tcp.map_or(0, |t| t.payload),
            next_seq: tcp.map_or(0, |t| t.seq.wrapping_add(t.payload as u32)),
            closed: mergeable.is_none_or(|t| t.flags & TCP_PSH != 0),
            head_checked: false,
            psh: false,
        });
    }

    fn try_append(&mut self, buf: &[u8], g: usize, i: usize, t: &Tcp) -> bool {
        let grp = self.groups[g];
        let Some(head) = grp.tcp else { return false };
        let fits = !grp.closed
            && t.flags & !TCP_PSH == TCP_ACK
            && t.seq == grp.next_seq
            && t.payload > 0
            && t.payload <= head.payload
            && grp.count < MAX_SEGS
            && head.hdr_len() + grp.payload + t.payload <= MAX_BYTES
            && (t.v6 || t.id == head.id.wrapping_add(grp.count as u16));
        if !fits {
            return false;
        }
        let p = self.pkts[i];
        if !tcp_checksum_ok(&buf[p.off..p.off + p.len], t) {
            return false;
        }
        if !grp.head_checked {
            let h = self.pkts[grp.head];
            if !tcp_checksum_ok(&buf[h.off..h.off + h.len], &head) {
                return false;
            }
        }
        self.pkts[grp.tail].next = i;
        let grp = &mut self.groups[g];
        grp.head_checked = true;
        grp.tail = i;
        grp.count += 1;
        grp.payload += t.payload;
        grp.next_seq = t.seq.wrapping_add(t.payload as u32);
        if t.flags & TCP_PSH != 0 {
            grp.psh = true;
            grp.closed = true;
        }
        if t.payload < head.payload {
            grp.closed = true;
        }
        true
    }

    /// Packets waiting.
    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// Writes every waiting packet to `tun` (merged where possible),
    /// forgets them and says what was merged. Rewrites the first packet's
    /// headers of merged groups in `buf`. A failed write loses its packets,
    /// as a NIC's full queue would; if the kernel refuses a merged packet
    /// as invalid, merging is turned off from then on.
    pub fn flush(&mut self, buf: &mut [u8], tun: BorrowedFd<'_>) -> WriteStats {
        let mut stats = WriteStats::default();
        let groups = std::mem::take(&mut self.groups);
        for g in &groups {
            let hdr = if g.count > 1 {
                self.finish(buf, g)
            } else {
                VnetHdr::default()
            };
            let hb = hdr.bytes();
            let mut iov: [libc::iovec; MAX_SEGS + 1] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_SEGS + 1];
            iov[0] = libc::iovec {
                iov_base: hb.as_ptr() as *mut libc::c_void,
                iov_len: hb.len(),
            };
            let mut n = 1;
            let mut k = g.head;
            let skip = g.tcp.map_or(0, |t| t.hdr_len());
            while k != usize::MAX && n <= MAX_SEGS {
                let p = self.pkts[k];
                // The first packet whole; the others' payloads only.
                let (start, len) = if k == g.head {
                    (p.off, p.len)
                } else {
                    (p.off + skip, p.len - skip)
                };
                iov[n] = libc::iovec {
                    iov_base: buf[start..start + len].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                };
                n += 1;
                k = p.next;
            }
            // SAFETY: every iovec points into `hb` or `buf`, both live and
            // not written during the call.
            let rc = unsafe { libc::writev(tun.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if g.count > 1 && e.raw_os_error() == Some(libc::EINVAL) {
                    tracing::warn!(error = %e, "the TUN refused a merged TCP packet; writing packets one by one from now on");
                    self.merge = false;
                }
            } else if g.count > 1 {
                stats.gso_writes += 1;
                stats.coalesced += g.count as u64;
            }
        }
        self.groups = groups;
        self.groups.clear();
        self.pkts.clear();
        stats
    }

    /// Rewrites a merged group's first packet's headers for the whole
    /// payload and returns the virtio header describing the merged packet.
    fn finish(&self, buf: &mut [u8], g: &Group) -> VnetHdr {
        let Some(t) = g.tcp else {
            return VnetHdr::default();
        };
        let h = self.pkts[g.head];
        let pkt = &mut buf[h.off..h.off + h.len];
        let l4_len = t.tcp_hl + g.payload;
        if t.v6 {
            pkt[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            pkt[2..4].copy_from_slice(&((t.ip_hl + l4_len) as u16).to_be_bytes());
            let c = ipv4_header_checksum(&pkt[..20]);
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        }
        if g.psh {
            pkt[t.ip_hl + 13] |= TCP_PSH;
        }
        // NEEDS_CSUM: the field holds the pseudo-header sum; the kernel
        // (or the device) completes it over the merged segment.
        let pseudo = fold(pseudo_sum(pkt, t.v6, 6, l4_len));
        pkt[t.ip_hl + 16..t.ip_hl + 18].copy_from_slice(&pseudo.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if t.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: t.hdr_len() as u16,
            gso_size: t.payload as u16,
            csum_start: t.ip_hl as u16,
            csum_offset: 16,
        }
    }
}

fn head_bytes<'a>(buf: &'a [u8], pkts: &[Pkt], g: &Group) -> &'a [u8] {
    let p = pkts[g.head];
    &buf[p.off..p.off + p.len]
}

/// Why a packet read from the TUN could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// Shorter than a virtio header, or its header does not fit the packet.
    Malformed,
    /// A large packet of a kind that is not split here (UDP GSO, or TCP
    /// without a sane segment size).
    Unsupported,
}

/// Completes a `NEEDS_CSUM` checksum in place: the field at
/// `csum_start + csum_offset` holds the pseudo-header sum.
pub fn complete_checksum(pkt: &mut [u8], csum_start: usize, csum_offset: usize) -> bool {
    let at = csum_start + csum_offset;
    if at + 2 > pkt.len() || csum_start > pkt.len() {
        return false;
    }
    let c = match !fold(sum(&pkt[csum_start..], 0)) {
        // A UDP checksum of 0 means "none" (and is invalid over IPv6):
        // send the other zero, as the kernel does (CSUM_MANGLED_0).
        0 => 0xffff,
        c => c,
    };
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Splits what one TUN read returned (virtio header + packet) into plain
/// packets, calling `out` with each. A packet without GSO is passed on in
/// place (its checksum completed if the kernel left it partial); a TCP
/// super-packet is cut into `gso_size` segments in `seg` (at least
/// `hdr_len + gso_size` bytes), each with its own length, id, sequence
/// number, flags and checksums. Returns the number of packets produced.
pub fn segment(
    read: &mut [u8],
    seg: &mut [u8],
    mut out: impl FnMut(&[u8]),
) -> Result<usize, ReadError> {
    let hdr = VnetHdr::parse(read).ok_or(ReadError::Malformed)?;
    let pkt = &mut read[VNET_HDR_LEN..];
    if hdr.gso_type & !GSO_ECN == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0
            && !complete_checksum(
                pkt,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )
        {
            return Err(ReadError::Malformed);
        }
        out(pkt);
        return Ok(1);
    }
    let v6 = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 => false,
        GSO_TCPV6 => true,
        _ => return Err(ReadError::Unsupported),
    };
    // The headers are found from the packet itself; the virtio header's
    // hdr_len is only a hint and csum_start must agree with the IP header.
    let ip_hl = if v6 {
        if pkt.len() < 40 || pkt[0] >> 4 != 6 || pkt[6] != 6 {
            return Err(ReadError::Unsupported);
        }
        40
    } else {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
            return Err(ReadError::Unsupported);
        }
        usize::from(pkt[0] & 0x0f) * 4
    };
    // An IPv4 header is at least 20 bytes (IHL >= 5); a smaller IHL must
    // not reach the header checksum (found by the virtio_header fuzzer).
    if ip_hl < 20 || usize::from(hdr.csum_start) != ip_hl || pkt.len() < ip_hl + 20 {
        return Err(ReadError::Malformed);
    }
    let tcp_hl = usize::from(pkt[ip_hl + 12] >> 4) * 4;
    let hl = ip_hl + tcp_hl;
    let mss = usize::from(hdr.gso_size);
    if tcp_hl < 20 || hl > pkt.len() || mss == 0 || hl + mss > seg.len() {
        return Err(ReadError::Malformed);
    }
    let payload = pkt.len() - hl;
    let seq0 = u32::from_be_bytes([
        pkt[ip_hl + 4],
        pkt[ip_hl + 5],
        pkt[ip_hl + 6],
        pkt[ip_hl + 7],
    ]);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ip_hl + 13];
    let mut n = 0;
    let mut at = 0;
    while at < payload || (payload == 0 && n == 0) {
        let len = mss.min(payload - at);
        let last = at + len >= payload;
        let s = &mut seg[..hl + len];
        s[..hl].copy_from_slice(&pkt[..hl]);
        s[hl..].copy_from_slice(&pkt[hl + at..hl + at + len]);
        let l4_len = tcp_hl + len;
        if v6 {
            s[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            s[2..4].copy_from_slice(&((ip_hl + l4_len) as u16).to_be_bytes());
            s[4..6].copy_from_slice(&id0.wrapping_add(n as u16).to_be_bytes());
            let c = ipv4_header_checksum(&s[..ip_hl]);
            s[10..12].copy_from_slice(&c.to_be_bytes());
        }
        s[ip_hl + 4..ip_hl + 8].copy_from_slice(&seq0.wrapping_add(at as u32).to_be_bytes());
        // FIN and PSH only on the last segment, CWR only on the first.
        let mut f = flags0;
        if !last {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if n > 0 {
            f &= !TCP_CWR;
        }
        s[ip_hl + 13] = f;
        s[ip_hl + 16..ip_hl + 18].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&s[ip_hl..], pseudo_sum(s, v6, 6, l4_len)));
        s[ip_hl + 16..ip_hl + 18].copy_from_slice(&c.to_be_bytes());
        out(s);
        n += 1;
        at += len;
        if payload == 0 {
            break;
        }
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The virtio_header fuzzer's crash: a TCPv4 GSO read whose IPv4 header
    /// claims IHL 0 (and csum_start 0 to match) indexed an empty header.
    #[test]
    fn fuzz_gso_read_with_ipv4_ihl_below_5_is_malformed_not_a_panic() {
        let mut read = vec![1u8, 1, 40, 0, 1, 0, 0, 0, 0, 6];
        read.extend_from_slice(&[0x40, 0x78, 0, 0, 0x78, 0x50, 0x78, 0x40, 0x78, 6]);
        read.extend_from_slice(&[0x8a; 60]);
        let mut seg = vec![0u8; 70_000];
        let r = segment(&mut read, &mut seg, |_| {});
        assert!(matches!(r, Err(ReadError::Malformed)), "{r:?}");
    }

    /// An IPv4 TCP segment with a correct checksum.
    fn seg4(seq: u32, id: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 32];
        p[0] = 0x45;
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[12..16].copy_from_slice(&[198, 18, 0, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 2]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = 8 << 4; // 32-byte header: timestamps
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        p.extend_from_slice(payload);
        fix4(&mut p);
        p
    }

    fn fix4(p: &mut [u8]) {
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        let c = ipv4_header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[36..38].copy_from_slice(&[0, 0]);
        let l4 = p.len() - 20;
        let c = !fold(sum(&p[20..], pseudo_sum(p, false, 6, l4)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    fn seg6(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 20];
        p[0] = 0x60;
        p[6] = 6;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = 1;
        p[24] = 0xfd;
        p[39] = 2;
        let t = &mut p[40..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        p.extend_from_slice(payload);
        let l4 = p.len() - 40;
        p[4..6].copy_from_slice(&(l4 as u16).to_be_bytes());
        let c = !fold(sum(&p[40..], pseudo_sum(&p, true, 6, l4)));
        p[56..58].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// Runs packets through a coalescer and returns, per write, the vnet
    /// header and the bytes after it (read back from a socket pair).
    fn run(pkts: &[Vec<u8>]) -> (Vec<(VnetHdr, Vec<u8>)>, WriteStats) {
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for p in pkts {
            spans.push((buf.len(), p.len()));
            buf.extend_from_slice(p);
        }
        let mut c = Coalescer::default();
        for &(o, l) in &spans {
            c.push(&buf, o, l);
        }
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        use std::os::fd::AsFd;
        let st = c.flush(&mut buf, a.as_fd());
        let mut out = Vec::new();
        let mut r = vec![0u8; 70_000];
        while let Ok(n) = b.recv(&mut r) {
            out.push((VnetHdr::parse(&r).unwrap(), r[VNET_HDR_LEN..n].to_vec()));
        }
        (out, st)
    }

    /// What a TUN read returns: the virtio header, then the packet.
    fn read_of(hdr: VnetHdr, pkt: &[u8]) -> Vec<u8> {
        let mut read = hdr.bytes().to_vec();
        read.extend_from_slice(pkt);
        read
    }

    /// Splits a merged write back with [`segment`].
    fn resegment(hdr: &VnetHdr, pkt: &[u8]) -> Vec<Vec<u8>> {
        let mut read = read_of(*hdr, pkt);
        // The merged packet carries a partial checksum; segment() writes
        // full ones, so it must not care.
        let mut seg = vec![0u8; 70_000];
        let mut v = Vec::new();
        segment(&mut read, &mut seg, |s| v.push(s.to_vec())).unwrap();
        v
    }

    #[test]
    fn checksum_matches_a_known_header() {
        // RFC 1071 style example: a real IPv4 header.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
        // Odd lengths pad with a zero byte.
        assert_eq!(fold(sum(&[0x01, 0x02, 0x03], 0)), 0x0402);
    }

    #[test]
    fn merges_in_order_segments_and_splits_back_to_the_same_bytes() {
        let a = seg4(1000, 7, TCP_ACK, &[1u8; 1000]);
        let b = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
        let c = seg4(3000, 9, TCP_ACK | TCP_PSH, &[3u8; 500]);
        let (w, st) = run(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(w.len(), 1, "one write");
        assert_eq!(st.gso_writes, 1);
        assert_eq!(st.coalesced, 3);
        let (h, p) = &w[0];
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(h.gso_size, 1000);
        assert_eq!(h.hdr_len, 52);
        assert_eq!(h.csum_start, 20);
        assert_eq!(h.csum_offset, 16);
        assert_eq!(p.len(), 52 + 2500);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(
            ipv4_header_checksum(&p[..20]),
            u16::from_be_bytes([p[10], p[11]])
        );
        // What the kernel's segmentation would produce is what was sent.
        assert_eq!(resegment(h, p), vec![a, b, c]);
    }

    #[test]
    fn ipv6_segments_merge() {
        let a = seg6(5, TCP_ACK, &[9u8; 1200]);
        let b = seg6(1205, TCP_ACK, &[8u8; 1200]);
        let (w, _) = run(&[a.clone(), b.clone()]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0.gso_type, GSO_TCPV6);
        assert_eq!(w[0].0.csum_start, 40);
        assert_eq!(resegment(&w[0].0, &w[0].1), vec![a, b]);
    }

    #[test]
    fn refuses_what_the_kernel_would_not_merge() {
        let base = seg4(1000, 7, TCP_ACK, &[1u8; 1000]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gap in sequence", seg4(2001, 8, TCP_ACK, &[2u8; 1000])),
            ("id not consecutive", seg4(2000, 10, TCP_ACK, &[2u8; 1000])),
            (
                "larger than the first",
                seg4(2000, 8, TCP_ACK, &[2u8; 1001]),
            ),
            ("FIN", seg4(2000, 8, TCP_ACK | TCP_FIN, &[2u8; 1000])),
            ("no payload", seg4(2000, 8, TCP_ACK, &[])),
            ("other flow", {
                let mut p = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
                p[21] ^= 1; // source port
                fix4(&mut p);
                p
            }),
            ("other TTL", {
                let mut p = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
                p[8] = 63;
                fix4(&mut p);
                p
            }),
            ("other options", {
                let mut p = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
                p[20 + 27] = 10; // timestamp value
                fix4(&mut p);
                p
            }),
            ("bad checksum", {
                let mut p = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
                p[100] ^= 0xff;
                p
            }),
        ];
        for (why, p) in cases {
            let (w, st) = run(&[base.clone(), p.clone()]);
            assert_eq!(w.len(), 2, "{why}: written separately");
            assert_eq!(st.gso_writes, 0, "{why}");
            assert_eq!(w[0], (VnetHdr::default(), base.clone()), "{why}: untouched");
            assert_eq!(w[1], (VnetHdr::default(), p), "{why}: untouched");
        }
    }

    #[test]
    fn a_bad_first_checksum_is_never_merged_into() {
        let mut a = seg4(1000, 7, TCP_ACK, &[1u8; 1000]);
        a[200] ^= 1;
        let b = seg4(2000, 8, TCP_ACK, &[2u8; 1000]);
        let (w, st) = run(&[a.clone(), b.clone()]);
        assert_eq!(st.gso_writes, 0);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].1, a);
    }

    #[test]
    fn interleaved_flows_merge_separately_and_keep_their_order() {
        let a1 = seg4(1000, 1, TCP_ACK, &[1u8; 100]);
        let mut b1 = seg4(50, 1, TCP_ACK, &[5u8; 100]);
        b1[23] ^= 1; // another destination port
        fix4(&mut b1);
        let a2 = seg4(1100, 2, TCP_ACK, &[2u8; 100]);
        let mut b2 = seg4(150, 2, TCP_ACK, &[6u8; 100]);
        b2[23] ^= 1;
        fix4(&mut b2);
        let udp = {
            let mut p = seg4(0, 0, TCP_ACK, &[0u8; 10]);
            p[9] = 17;
            p
        };
        let (w, st) = run(&[a1.clone(), b1.clone(), udp.clone(), a2.clone(), b2.clone()]);
        assert_eq!(st.gso_writes, 2);
        assert_eq!(w.len(), 3);
        assert_eq!(resegment(&w[0].0, &w[0].1), vec![a1, a2]);
        assert_eq!(resegment(&w[1].0, &w[1].1), vec![b1, b2]);
        assert_eq!(w[2].1, udp);
    }

    #[test]
    fn a_short_segment_ends_the_group() {
        let a = seg4(0, 1, TCP_ACK, &[1u8; 100]);
        let b = seg4(100, 2, TCP_ACK, &[2u8; 50]);
        let c = seg4(150, 3, TCP_ACK, &[3u8; 50]);
        let (w, _) = run(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(w.len(), 2);
        assert_eq!(resegment(&w[0].0, &w[0].1), vec![a, b]);
        assert_eq!(w[1].1, c);
    }

    #[test]
    fn segment_passes_plain_packets_and_completes_partial_checksums() {
        let p = seg4(1, 1, TCP_ACK, &[7u8; 33]);
        let mut partial = p.clone();
        let pseudo = fold(pseudo_sum(&partial, false, 6, partial.len() - 20));
        partial[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut read = read_of(hdr, &partial);
        let mut seg = vec![0u8; 2048];
        let mut got = Vec::new();
        assert_eq!(
            segment(&mut read, &mut seg, |s| got.push(s.to_vec())),
            Ok(1)
        );
        assert_eq!(got, vec![p]);
    }

    #[test]
    fn a_completed_checksum_is_never_zero() {
        // A UDP packet whose data makes the checksum come out as 0.
        let mut p = vec![0u8; 8 + 2];
        // Field holds the (here: zero) pseudo sum; data 0xffff sums to
        // 0xffff, whose complement is 0.
        p[8] = 0xff;
        p[9] = 0xff;
        assert!(complete_checksum(&mut p, 0, 6));
        assert_eq!(&p[6..8], &[0xff, 0xff]);
    }

    #[test]
    fn segment_rejects_malformed_headers_without_panicking() {
        let mut seg = vec![0u8; 2048];
        let tcp = seg4(0, 0, TCP_ACK, &[0u8; 100]);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 5],
            read_of(
                VnetHdr {
                    gso_type: GSO_TCPV4,
                    gso_size: 0,
                    csum_start: 20,
                    ..Default::default()
                },
                &tcp,
            ),
            read_of(
                VnetHdr {
                    gso_type: 3, // UDP
                    gso_size: 100,
                    ..Default::default()
                },
                &[0x45; 60],
            ),
            read_of(
                VnetHdr {
                    flags: F_NEEDS_CSUM,
                    csum_start: 500,
                    ..Default::default()
                },
                &[0x45; 60],
            ),
            read_of(
                VnetHdr {
                    gso_type: GSO_TCPV4,
                    gso_size: 5000, // larger than the segment buffer
                    csum_start: 20,
                    ..Default::default()
                },
                &tcp,
            ),
        ];
        for mut c in cases {
            assert!(segment(&mut c, &mut seg, |_| {}).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn segment_never_panics(mut data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let mut seg = vec![0u8; 2048];
            let _ = segment(&mut data, &mut seg, |_| {});
        }

        #[test]
        fn coalescer_never_panics_and_keeps_every_byte(
            sizes in proptest::collection::vec(1usize..1500, 1..20),
            breaks in proptest::collection::vec(proptest::prelude::any::<bool>(), 20),
        ) {
            let mut pkts = Vec::new();
            let mut seq = 0u32;
            for (i, s) in sizes.iter().enumerate() {
                if breaks[i] { seq = seq.wrapping_add(1); }
                pkts.push(seg4(seq, i as u16, TCP_ACK, &vec![i as u8; *s]));
                seq = seq.wrapping_add(*s as u32);
            }
            let (w, _) = run(&pkts);
            let mut back = Vec::new();
            for (h, p) in &w {
                if h.gso_type == GSO_NONE { back.push(p.clone()) } else { back.extend(resegment(h, p)) }
            }
            proptest::prop_assert_eq!(back, pkts);
        }
    }
}
