//! The median of a sample.

use std::time::Duration;

/// A value that has a point halfway between two others (for an even count's median).
pub trait Midpoint: Copy {
    fn halfway(a: Self, b: Self) -> Self;
}

impl Midpoint for f64 {
    fn halfway(a: f64, b: f64) -> f64 {
        a.midpoint(b)
    }
}

impl Midpoint for Duration {
    fn halfway(a: Duration, b: Duration) -> Duration {
        a.min(b) + a.abs_diff(b) / 2
    }
}

/// The median of `sorted` (ascending): its middle value, or halfway between its two middle
/// values when their count is even. `None` when empty.
pub fn median<T: Midpoint>(sorted: &[T]) -> Option<T> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(T::halfway(sorted[n / 2 - 1], sorted[n / 2])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_odd_count_has_its_middle_value_and_an_even_count_the_mean_of_its_two() {
        assert_eq!(median::<f64>(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), Some(3.0));
        assert_eq!(median(&[1.0, 5.0]), Some(3.0));
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(10), ms(20)]), Some(ms(15)));
        assert_eq!(median(&[ms(10), ms(20), ms(30), ms(41)]), Some(ms(25)));
        assert_eq!(
            median(&[Duration::MAX, Duration::MAX]),
            Some(Duration::MAX),
            "no overflow"
        );
    }
}
