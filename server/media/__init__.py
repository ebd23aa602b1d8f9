"""Media: sniffing and decoding images and clips, the decode pool and pixel budget, preprocessing."""
