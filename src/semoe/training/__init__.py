"""semoe.training"""
