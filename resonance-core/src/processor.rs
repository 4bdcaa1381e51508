//! Helpers shared by the vision-language processors.

use crate::error::{CoreError, Result};

/// Replaces each occurrence of `image_token_id` in `ids` by `tokens_per_image[i]` copies of it
/// (the i-th occurrence gets the i-th count), as transformers' processors expand the single
/// `<image>` placeholder into one token per image feature.
///
/// Fails if the number of image tokens in `ids` differs from `tokens_per_image.len()`.
pub fn expand_image_tokens(
    ids: &[u32],
    image_token_id: u32,
    tokens_per_image: &[usize],
) -> Result<Vec<u32>> {
    let found = ids.iter().filter(|&&t| t == image_token_id).count();
    if found != tokens_per_image.len() {
        return Err(CoreError::InvalidInput(format!(
            "the prompt has {found} image token(s) (id {image_token_id}) but {} image(s) were given",
            tokens_per_image.len()
        )));
    }
    let extra: usize = tokens_per_image.iter().sum::<usize>();
    let mut out = Vec::with_capacity(ids.len() - found + extra);
    let mut counts = tokens_per_image.iter();
    for &t in ids {
        if t == image_token_id {
            let n = counts.next().copied().unwrap_or(0);
            out.extend(std::iter::repeat_n(image_token_id, n));
        } else {
            out.push(t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_each_occurrence_with_its_count() {
        let ids = [1, 32000, 5, 6, 32000, 2];
        let out = expand_image_tokens(&ids, 32000, &[3, 1]).unwrap();
        assert_eq!(out, vec![1, 32000, 32000, 32000, 5, 6, 32000, 2]);
    }

    #[test]
    fn no_images_is_identity_and_zero_count_removes() {
        assert_eq!(
            expand_image_tokens(&[1, 2, 3], 9, &[]).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            expand_image_tokens(&[1, 9, 3], 9, &[0]).unwrap(),
            vec![1, 3]
        );
    }

    #[test]
    fn count_mismatch_is_an_error() {
        let err = expand_image_tokens(&[1, 9, 9], 9, &[4]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prompt has 2 image token(s) (id 9) but 1 image(s) were given"
        );
        assert!(expand_image_tokens(&[1, 2], 9, &[4]).is_err());
    }
}
