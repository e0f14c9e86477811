//! The learning-rate schedule: linear warm-up, then cosine decay.

use crate::OptimConfig;

/// The learning rate of optimizer step `step` (0-based): `lr · (step+1)/warmup`
/// during warm-up, then a cosine from `lr` down to `min_lr` at the last step.
pub fn learning_rate(config: &OptimConfig, step: u64) -> f64 {
    let (peak, floor) = (config.lr, config.min_lr);
    if step < config.warmup_steps {
        return peak * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let decay_steps = config.steps.saturating_sub(config.warmup_steps).max(1);
    let progress = ((step - config.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(steps: u64, warmup: u64) -> OptimConfig {
        toml::from_str(&format!(
            "steps = {steps}\nmicro_batch = 1\nlr = 1.0\nmin_lr = 0.1\nwarmup_steps = {warmup}"
        ))
        .unwrap()
    }

    #[test]
    fn warmup_is_linear_and_decay_ends_at_min_lr() {
        let c = config(110, 10);
        assert!((learning_rate(&c, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 4) - 0.5).abs() < 1e-12);
        assert!((learning_rate(&c, 10) - 1.0).abs() < 1e-12);
        // Half-way through the decay: the mean of peak and floor.
        assert!((learning_rate(&c, 60) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&c, 110) - 0.1).abs() < 1e-12);
        let lrs: Vec<f64> = (10..110).map(|s| learning_rate(&c, s)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
