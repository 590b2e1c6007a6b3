"""Automatic storyboard scores for toon videos (`python -m tttjax.eval`).

  detector   a small CNN reading each frame's characters, cheese and room, trained on the
             renderer's ground truth only (`python -m tttjax.eval.detector`)
  score      `following` and `consistency` of a video against its storyboard
"""
