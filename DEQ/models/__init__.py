from .mdeq import MDEQClsNet, DEQOutput, TrainOutput, build_model

__all__ = ["MDEQClsNet", "DEQOutput", "TrainOutput", "build_model"]
