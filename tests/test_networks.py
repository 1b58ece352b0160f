"""The generator's optional z Fourier features (GeneratorConfig.mapping_z_fourier)."""
import torch

from draggan_core.model.checkpoints import load_generator, save_native
from draggan_core.model.networks import Generator, GeneratorConfig, z_fourier_features


def test_z_fourier_features_feed_the_mapping(tmp_path):
    z = torch.tensor([[0.0, 10.0]])
    f = z_fourier_features(z, 2)
    assert f.shape == (1, 8)
    # Phi(0) = 0.5: sin(pi) = 0, cos(pi) = -1, sin(2 pi) = 0, cos(2 pi) = 1; Phi(10) ~ 1: cos(2 pi k) ~ 1
    assert torch.allclose(f[0, [0, 2, 4, 6]], torch.tensor([0.0, -1.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(f[0, [3, 7]], torch.ones(2), atol=1e-5)
    cfg = GeneratorConfig(z_dim=4, w_dim=8, img_resolution=8, mapping_layers=2, channel_base=64, channel_max=8,
                          mapping_z_fourier=2)
    G = Generator(cfg)
    assert G.mapping.fc0.weight.shape == (8, 4 * 5)
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg
    assert G(torch.randn(2, 4)).shape == (2, 3, 8, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        G.mapping.fc0.weight.normal_()  # the new inputs matter (a trained model's are not zero)
    z = torch.randn(2, 4)
    save_native(G, tmp_path / "g.safetensors")
    loaded = load_generator(tmp_path / "g.safetensors")
    assert loaded.cfg.mapping_z_fourier == 2
    assert torch.allclose(loaded(z), G(z), atol=1e-5)
