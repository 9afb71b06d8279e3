"""Pretrained perception: LPIPS, reconstruction metrics (PSNR, SSIM, rFID) and where their
weights come from. Used by training's perceptual loss and by evaluation alike."""
