"""LayerDiffuse models: transparent VAE decoder, latent-transparency offset encoder, SD1.5 attention unit."""
from .transparent_vae import (
    LatentTransparencyOffsetEncoder,
    TransparentVAEDecoder,
    WeightsError,
    load_offset_encoder,
    load_transparent_decoder,
)

__all__ = ["LatentTransparencyOffsetEncoder", "TransparentVAEDecoder", "WeightsError", "load_offset_encoder",
           "load_transparent_decoder"]
