//! Seed inputs for structure-aware targets: the bytes that `arbitrary` decodes back into a
//! given value, so the committed corpora can start from realistic inputs (real descriptor
//! chains, real frames, real control conversations) rather than from random bytes.
//!
//! The encoding mirrors `arbitrary` 1.x's decoding: integers little-endian, `bool` as one
//! byte, an enum variant as a `u32` scaled over the variant count, `Option` as a flag then the
//! value, a `Vec` as a "more" flag before each element and a cleared flag at its end. The
//! unit tests decode what is encoded here and compare, so a change of `arbitrary`'s format
//! shows up as a failing test, not as silently useless seeds.

/// A value that can be written as the bytes `arbitrary` reads it from.
pub trait Seed {
    /// Appends the encoding of `self` to `out`.
    fn put(&self, out: &mut Vec<u8>);

    /// The encoding of `self` as a whole fuzz input.
    fn to_input(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.put(&mut out);
        out
    }
}

/// Appends the selector of variant `index` of an enum with `count` variants.
pub fn variant(out: &mut Vec<u8>, index: u32, count: u32) {
    // `arbitrary` picks variant (x * count) >> 32 for a u32 x: the smallest x that picks
    // `index` is ceil(index * 2^32 / count).
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    out.extend_from_slice(&(x as u32).to_le_bytes());
}

macro_rules! ints {
    ($($t:ty),*) => {$(
        impl Seed for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
ints!(u8, u16, u32, u64, i8, i16, i32, i64, usize);

impl Seed for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Seed> Seed for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Some(v) => {
                out.push(1);
                v.put(out);
            }
            None => out.push(0),
        }
    }
}

impl<T: Seed> Seed for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        for v in self {
            out.push(1);
            v.put(out);
        }
        out.push(0);
    }
}

impl<T: Seed, const N: usize> Seed for [T; N] {
    fn put(&self, out: &mut Vec<u8>) {
        for v in self {
            v.put(out);
        }
    }
}

impl<A: Seed, B: Seed> Seed for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
}

/// Defines a struct that derives `Arbitrary` (and `Debug`, `Clone`, `PartialEq`) together
/// with its [`Seed`] encoding, field by field in declaration order.
#[macro_export]
macro_rules! seed_struct {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $fvis:vis $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(arbitrary::Arbitrary, Debug, Clone, PartialEq)]
        $vis struct $name { $($(#[$fm])* $fvis $field: $ty),* }

        impl $crate::seed::Seed for $name {
            fn put(&self, out: &mut Vec<u8>) {
                $($crate::seed::Seed::put(&self.$field, out);)*
            }
        }
    };
}

/// Defines an enum that derives `Arbitrary` (and `Debug`, `Clone`, `PartialEq`) together
/// with its [`Seed`] encoding. Variants are unit variants or struct variants.
#[macro_export]
macro_rules! seed_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident {
        $($(#[$vm:meta])* $variant:ident $({ $($field:ident : $ty:ty),* $(,)? })?),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(arbitrary::Arbitrary, Debug, Clone, PartialEq)]
        $vis enum $name { $($(#[$vm])* $variant $({ $($field: $ty),* })?),* }

        impl $crate::seed::Seed for $name {
            #[allow(unused_assignments, unused_variables)]
            fn put(&self, out: &mut Vec<u8>) {
                let names: &[&str] = &[$(stringify!($variant)),*];
                let count = names.len() as u32;
                let mut index = 0u32;
                $(
                    if let $name::$variant $({ $($field),* })? = self {
                        $crate::seed::variant(out, index, count);
                        $($($crate::seed::Seed::put($field, out);)*)?
                        return;
                    }
                    index += 1;
                )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::{Arbitrary, Unstructured};

    seed_enum! {
        enum Shape {
            Unit,
            Pair { a: u16, b: Option<u32> },
            List { items: Vec<u8> },
            Last,
        }
    }

    seed_struct! {
        struct Outer {
            flag: bool,
            shapes: Vec<Shape>,
            word: u64,
            tail: Vec<Shape>,
        }
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_value() {
        let v = Outer {
            flag: true,
            shapes: vec![
                Shape::Unit,
                Shape::Pair {
                    a: 0xbeef,
                    b: Some(7),
                },
                Shape::List {
                    items: vec![1, 2, 3],
                },
                Shape::Last,
            ],
            word: u64::MAX - 3,
            tail: vec![Shape::Pair { a: 1, b: None }, Shape::Unit],
        };
        let bytes = v.to_input();
        let back = Outer::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn every_variant_of_a_large_enum_is_reached() {
        for count in [2u32, 3, 7, 10, 255] {
            for index in 0..count {
                let mut out = Vec::new();
                variant(&mut out, index, count);
                let x = u32::from_le_bytes(out.try_into().unwrap());
                assert_eq!(((u64::from(x) * u64::from(count)) >> 32) as u32, index);
            }
        }
    }
}
