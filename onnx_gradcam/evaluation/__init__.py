"""Evaluation of maps: faithfulness (deletion/insertion, ROAD, confidence change), localisation
(pointing game, the Grad-CAM paper's boxes) and sanity checks, on the prepared model itself."""
