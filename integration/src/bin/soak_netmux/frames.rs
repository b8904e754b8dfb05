//! The frames harness guests send each other: numbered per sender, with a payload derived
//! from (sender, number) so that a corrupted frame is caught.

/// Bytes of the virtio-net header in front of every frame (VERSION_1: 12).
pub const HDR: usize = 12;
/// Ethernet frame length (without the virtio-net header).
pub const FRAME_LEN: usize = 128;
/// IEEE 802 local experimental ethertype 1.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 4] = b"DSSK";

/// Guest `i`'s MAC address (locally administered).
pub fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x5a, 0x00, (i + 1) as u8]
}

/// The same as text, as netmux's `--port mac=` takes it.
pub fn mac_text(i: usize) -> String {
    mac(i)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pattern(src: u8, seq: u64, k: usize) -> u8 {
    (seq as u8).wrapping_mul(31) ^ (k as u8) ^ src.rotate_left(3)
}

/// Writes header and frame number `seq` from guest `src` to guest `dst` into `out`
/// (`HDR + FRAME_LEN` bytes).
pub fn build(out: &mut [u8], src: usize, dst: usize, seq: u64) {
    out[..HDR].fill(0);
    let f = &mut out[HDR..HDR + FRAME_LEN];
    f[0..6].copy_from_slice(&mac(dst));
    f[6..12].copy_from_slice(&mac(src));
    f[12..14].copy_from_slice(&ETHERTYPE);
    f[14..18].copy_from_slice(MAGIC);
    f[18] = src as u8;
    f[19..27].copy_from_slice(&seq.to_be_bytes());
    for (k, b) in f[27..].iter_mut().enumerate() {
        *b = pattern(src as u8, seq, k);
    }
}

/// What a received frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Frame `seq` from guest `src`, intact.
    Ours {
        /// Sender.
        src: usize,
        /// Its number.
        seq: u64,
    },
    /// Not a soak frame at all (another ethertype: something from the uplink's wire).
    Foreign,
}

/// What a received frame (`bytes`, without the virtio-net header) is for guest `me`; Err if
/// it carries our ethertype but is not exactly what was sent.
pub fn parse(bytes: &[u8], me: usize) -> Result<Received, String> {
    if bytes.get(12..14) != Some(&ETHERTYPE[..]) {
        return Ok(Received::Foreign);
    }
    if bytes.len() != FRAME_LEN {
        return Err(format!(
            "soak frame of {} bytes, sent {FRAME_LEN}",
            bytes.len()
        ));
    }
    if bytes[0..6] != mac(me) || &bytes[14..18] != MAGIC {
        return Err(format!(
            "not a soak frame for guest {me}: {:02x?}",
            &bytes[..18]
        ));
    }
    let src = usize::from(bytes[18]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[19..27]);
    let seq = u64::from_be_bytes(n);
    if bytes[6..12] != mac(src) {
        return Err(format!(
            "frame {seq} from guest {src} carries another source MAC"
        ));
    }
    if let Some(k) = bytes[27..]
        .iter()
        .enumerate()
        .position(|(k, &b)| b != pattern(src as u8, seq, k))
    {
        return Err(format!(
            "frame {seq} from guest {src}: payload byte {k} corrupted"
        ));
    }
    Ok(Received::Ours { src, seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut buf = vec![0u8; HDR + FRAME_LEN];
        build(&mut buf, 1, 0, 123_456);
        assert_eq!(
            parse(&buf[HDR..], 0),
            Ok(Received::Ours {
                src: 1,
                seq: 123_456
            })
        );
        assert!(parse(&buf[HDR..], 1).is_err());
        assert!(parse(&buf[HDR..HDR + 100], 0).is_err());
        buf[HDR + 100] ^= 1;
        assert!(parse(&buf[HDR..], 0).unwrap_err().contains("corrupted"));
        buf[HDR + 12] = 0x86;
        assert_eq!(parse(&buf[HDR..], 0), Ok(Received::Foreign));
        assert_eq!(mac_text(0), "52:54:00:5a:00:01");
    }
}
